//! Progress bars on stderr, shown only to a person watching a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Ui {
    show: bool,
    quiet: bool,
}

impl Ui {
    pub fn new(quiet: bool) -> Self {
        Ui {
            show: !quiet && std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Whether `--quiet` asked for no summaries either.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// A byte-counting bar for one transfer; hidden when not shown.
    pub fn bar(&self, total: u64, label: &str) -> ProgressBar {
        if !self.show {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        bar
    }
}
