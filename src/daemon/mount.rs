//! The daemon's own mount namespace: slave propagation, and no copy of a ublk device's mount
//! from before it started, so its exit never blocks on unmounting a file system on its own
//! device, and an unmount on the host (a disk taken out, a device's file system) reaches it.

use anyhow::{Context, Result};

/// A mount namespace of the daemon's own, a slave of the host's: mounts and unmounts on the host
/// reach it, nothing made in it reaches the host. Slave, not private: a private copy keeps every
/// file system that was mounted when the daemon started, so a disk the operator unmounts later
/// (to replace it, or to check it after it failed) stays busy until the daemon exits. A file
/// system mounted on its own device appears in it only while the host has it mounted, and the
/// host's unmount removes it here too, so the daemon never holds the last reference to one.
/// Must run before any thread is started (unshare of the fs context fails in a threaded
/// process).
pub fn private_mount_namespace() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS): a mount namespace")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .context("making the daemon's mounts slaves of the host's")?;
    // The new namespace starts as a copy of the old one: a daemon re-attaching after a crash
    // would hold its own device's file system (still mounted by its users) and keep it alive
    // after they unmount it. Detach every copied mount of a ublk device; users' mounts outside
    // this namespace are untouched.
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for mount_point in ublk_mounts(&mountinfo).into_iter().rev() {
        nix::mount::umount2(mount_point.as_str(), nix::mount::MntFlags::MNT_DETACH).with_context(
            || format!("detaching the copy of {mount_point} in the daemon's mount namespace"),
        )?;
    }
    Ok(())
}

/// Mount points in `mountinfo` (the format of /proc/self/mountinfo) whose source is a ublk block
/// device, in mount order.
fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let source = after.split(' ').nth(1)?;
            source.starts_with("/dev/ublkb").then(|| unescape_mountinfo(mount_point))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_in_mountinfo() {
        let info = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
62 59 259:0 / /tmp/m rw,relatime - ext4 /dev/ublkb0 rw
63 62 0:50 / /tmp/m/sub rw - tmpfs tmpfs rw
64 22 259:1 / /mnt/with\\040space rw shared:9 - xfs /dev/ublkb12 rw,attr2
65 22 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw
";
        assert_eq!(ublk_mounts(info), vec!["/tmp/m".to_string(), "/mnt/with space".to_string()]);
        assert!(ublk_mounts("garbage\n\n - \n").is_empty());
    }
}
