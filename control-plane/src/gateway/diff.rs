//! What an approver is shown: the exact lines a change replaces, nothing summarised.

/// The exact difference between two texts: the lines that differ, between the longest
/// common beginning and end, each marked `-` (before) or `+` (after), with line numbers.
pub fn diff(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let head = b.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let tail = b[head..]
        .iter()
        .rev()
        .zip(a[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut out = String::new();
    if b == a {
        if before != after {
            out.push_str("(only the final newline differs)\n");
        }
        return out;
    }
    out.push_str(&format!(
        "@@ before line {}, after line {} @@\n",
        head + 1,
        head + 1
    ));
    for line in &b[head.saturating_sub(2)..head] {
        out.push_str(&format!("  {line}\n"));
    }
    for line in &b[head..b.len() - tail] {
        out.push_str(&format!("- {line}\n"));
    }
    for line in &a[head..a.len() - tail] {
        out.push_str(&format!("+ {line}\n"));
    }
    for line in &b[b.len() - tail..(b.len() - tail + 2).min(b.len())] {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_shows_exactly_the_changed_lines() {
        let d = diff("a\nb\nc\nd\n", "a\nb\nX\nd\n");
        assert_eq!(
            d,
            "@@ before line 3, after line 3 @@\n  a\n  b\n- c\n+ X\n  d\n"
        );
        assert_eq!(diff("a\n", "a\n"), "");
    }
}
