//! Byte sizes on the command line: `4096`, `64K`, `64KiB`, `1G`, `1.5GiB` (binary units).

/// Parses a size; `K`, `M`, `G`, `T` (optionally followed by `iB` or `B`) are powers of 1024.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size unit in {text:?} (use K, M, G or T)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("64K"), Ok(65536));
        assert_eq!(parse("64KiB"), Ok(65536));
        assert_eq!(parse("1G"), Ok(1 << 30));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert!(parse("12Q").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1").is_err());
        assert!(parse("0.3K").is_err());
    }
}
