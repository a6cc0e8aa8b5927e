//! Byte sizes on the command line: `4096`, `64K`, `64KiB`, `1G`, `1.5GiB` (binary units).

/// Parses a size; `K`, `M`, `G`, `T` (optionally followed by `iB` or `B`) are powers of 1024.
/// Exact: the arithmetic is in integers, so every size up to `u64::MAX` bytes is read as
/// written, and a fraction must come to a whole number of bytes.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B')
    {
        "" => 0u32,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size unit in {text:?} (use K, M, G or T)")),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
        return Err(format!("{text:?} is not a size"));
    }
    // The number as whole * 10^n + fraction over 10^n, in u128: at most 38 digits in all.
    let too_big = || format!("{text:?} is more than {} bytes", u64::MAX);
    let fraction = fraction.trim_end_matches('0');
    if whole.trim_start_matches('0').len() + fraction.len() > 38 {
        return Err(too_big());
    }
    let scale = 10u128.pow(fraction.len() as u32);
    let mut scaled: u128 = format!("{whole}{fraction}").parse().map_err(|_| too_big())?;
    scaled = scaled.checked_mul(1u128 << shift).ok_or_else(too_big)?;
    if scaled % scale != 0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_big())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse;

    #[test]
    fn units() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("64K"), Ok(65536));
        assert_eq!(parse("64KiB"), Ok(65536));
        assert_eq!(parse("1G"), Ok(1 << 30));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse("1.50G"), Ok(3 << 29));
        assert_eq!(parse("0.5K"), Ok(512));
        assert!(parse("12Q").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("1.2.3").is_err());
        assert!(parse(".5K").is_err());
        assert!(parse("0.3K").unwrap_err().contains("whole number of bytes"));
    }

    /// Through f64, 2^53 + 1 read as 2^53; every size up to u64::MAX is now exact.
    #[test]
    fn exact_to_the_last_byte() {
        assert_eq!(parse("9007199254740993"), Ok((1 << 53) + 1));
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
        assert!(parse("18446744073709551616").unwrap_err().contains("more than"));
        assert_eq!(parse("16777215T"), Ok(16777215 << 40));
        assert!(parse("16777216T").unwrap_err().contains("more than"));
        assert!(parse("99999999999999999999999999999999999999999T").is_err());
        assert_eq!(parse("0000000000000000000000000000000000000000001K"), Ok(1024));
    }
}
