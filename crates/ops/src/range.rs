//! Threshold ranges as the monitoring-plugins guidelines define them: `10` (alert outside
//! 0..=10), `10:` (below 10), `~:10` (above 10), `10:20` (outside 10..=20), `@10:20` (inside).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    start: f64,
    end: f64,
    inside: bool,
    text: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid threshold range `{0}`: use N, N:, ~:N, N:M or @N:M")]
pub struct RangeError(String);

impl FromStr for Range {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || RangeError(text.to_owned());
        let (inside, body) = match text.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let number = |s: &str| s.parse::<f64>().ok().filter(|n| n.is_finite());
        let (start, end) = match body.split_once(':') {
            None => (0.0, number(body).ok_or_else(err)?),
            Some((start, end)) => {
                let start = match start {
                    "~" => f64::NEG_INFINITY,
                    "" => 0.0,
                    s => number(s).ok_or_else(err)?,
                };
                let end = match end {
                    "" => f64::INFINITY,
                    s => number(s).ok_or_else(err)?,
                };
                (start, end)
            }
        };
        if body.is_empty() || start > end {
            return Err(err());
        }
        Ok(Self {
            start,
            end,
            inside,
            text: text.to_owned(),
        })
    }
}

impl Range {
    /// Whether `value` should raise the alert this range stands for.
    pub fn alerts(&self, value: f64) -> bool {
        let within = self.start <= value && value <= self.end;
        within == self.inside
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Range {
        s.parse().expect("range")
    }

    #[test]
    fn plain_number_alerts_outside_zero_to_n() {
        let x = r("10");
        assert!(!x.alerts(0.0) && !x.alerts(10.0) && !x.alerts(5.0));
        assert!(x.alerts(10.5) && x.alerts(-1.0));
    }

    #[test]
    fn open_ended_ranges() {
        assert!(r("10:").alerts(9.0));
        assert!(!r("10:").alerts(10.0) && !r("10:").alerts(1e9));
        assert!(r("~:10").alerts(11.0));
        assert!(!r("~:10").alerts(-1e9) && !r("~:10").alerts(10.0));
    }

    #[test]
    fn bounded_and_inverted_ranges() {
        let x = r("10:20");
        assert!(x.alerts(9.0) && x.alerts(21.0));
        assert!(!x.alerts(10.0) && !x.alerts(20.0) && !x.alerts(15.0));
        let inside = r("@10:20");
        assert!(inside.alerts(10.0) && inside.alerts(20.0) && inside.alerts(15.0));
        assert!(!inside.alerts(9.0) && !inside.alerts(21.0));
    }

    #[test]
    fn malformed_ranges_are_rejected() {
        for bad in ["", "@", "abc", "20:10", "1:2:3", "~", "10:x", "NaN", "inf"] {
            assert!(bad.parse::<Range>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_is_the_text_given() {
        assert_eq!(r("~:10").to_string(), "~:10");
    }
}
