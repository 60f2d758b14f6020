//! The live line printed each second: a progress bar (indicatif) on a
//! terminal, plain lines otherwise (logs, CI, pipes).

use crate::report::{fmt_us, Interval};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub enum Progress {
    Quiet,
    Plain,
    Bar(ProgressBar),
}

impl Progress {
    /// `total_s`: the run's length for the bar (warmup + duration), if known.
    pub fn new(quiet: bool, total_s: Option<u64>) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if !std::io::stdout().is_terminal() {
            return Progress::Plain;
        }
        let bar = match total_s {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let style = ProgressStyle::with_template("{bar:24.cyan/blue} {pos:>4}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress::Bar(bar)
    }

    pub fn line(i: &Interval, phase: &str) -> String {
        format!(
            "[{:>6.1}s {phase}] {:>10.0} ops/s {:>9.1} MB/s  p50 {:>8}  p99 {:>8}  errors {}",
            i.t_s,
            i.ops_per_s,
            i.mb_per_s,
            fmt_us(i.p50_us),
            fmt_us(i.p99_us),
            i.errors
        )
    }

    pub fn tick(&self, i: &Interval, phase: &str, elapsed_s: u64) {
        match self {
            Progress::Quiet => {}
            Progress::Plain => println!("{}", Self::line(i, phase)),
            Progress::Bar(b) => {
                b.set_position(elapsed_s);
                b.set_message(Self::line(i, phase));
            }
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
