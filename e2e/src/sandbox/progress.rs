//! What the sandbox shows while it works: numbered steps with spinners, and one bar per lab
//! while the fleet converges. On a terminal indicatif draws them; elsewhere (CI, tests, a
//! pipe) every step start and end is a plain line instead.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The step list of one run.
#[derive(Debug, Clone)]
pub struct Progress {
    multi: MultiProgress,
    interactive: bool,
    total: usize,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Progress {
    /// Bars on stderr when it is a terminal, plain lines otherwise.
    pub fn new(total: usize) -> Self {
        let interactive = std::io::stderr().is_terminal();
        Self::with(total, interactive)
    }

    /// Plain lines only (tests).
    pub fn plain(total: usize) -> Self {
        Self::with(total, false)
    }

    fn with(total: usize, interactive: bool) -> Self {
        let target = if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            interactive,
            total,
            done: Default::default(),
        }
    }

    pub fn interactive(&self) -> bool {
        self.interactive
    }

    /// Starts the next numbered step.
    pub fn step(&self, what: &str) -> Step {
        let n = self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let label = format!("[{n}/{}] {what}", self.total.max(n));
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {prefix} {wide_msg:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(label.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        if !self.interactive {
            eprintln!("kmm-sandbox: {label} ...");
        }
        Step {
            bar,
            label,
            started: Instant::now(),
            interactive: self.interactive,
        }
    }

    /// A bar of `len` units under the current step (one per lab while converging).
    pub fn bar(&self, name: &str, len: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "    {prefix:<24} [{bar:20.green/dim}] {pos}/{len} nodes  {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        bar
    }

    /// Print a line without tearing the bars.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.interactive {
            let _ = self.multi.println(line.as_ref());
        } else {
            eprintln!("kmm-sandbox: {}", line.as_ref());
        }
    }

    /// Run `f` with the bars hidden (for output of other code).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }

    pub fn clear(&self) {
        let _ = self.multi.clear();
    }
}

/// One running step.
#[derive(Debug)]
pub struct Step {
    bar: ProgressBar,
    label: String,
    started: Instant,
    interactive: bool,
}

impl Step {
    pub fn message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// The step succeeded; `detail` is shown after it.
    pub fn done(self, detail: impl AsRef<str>) {
        let took = self.started.elapsed();
        let detail = detail.as_ref();
        let line = if detail.is_empty() {
            format!("✓ {} ({:.1?})", self.label, took)
        } else {
            format!("✓ {} — {detail} ({:.1?})", self.label, took)
        };
        self.finish(line);
    }

    /// The step failed.
    pub fn failed(self, why: impl AsRef<str>) {
        let line = format!("✗ {} — {}", self.label, why.as_ref());
        self.finish(line);
    }

    fn finish(self, line: String) {
        self.bar.set_style(
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if self.interactive {
            self.bar.finish_with_message(line);
        } else {
            self.bar.finish_and_clear();
            eprintln!("kmm-sandbox: {line}");
        }
    }
}
