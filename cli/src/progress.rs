//! Progress bars on a terminal (and warnings on stderr) for the client library's long work.

use std::io::IsTerminal;
use std::sync::Mutex;

use shardfarm_client::Progress;

/// Draws one bar per transfer on stderr when it is a terminal; prints warnings always.
#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress for Bar {
    fn begin(&self, what: &'static str, total: u64) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_message(what);
        *self.bar.lock().unwrap() = Some(pb);
    }

    fn advance(&self, bytes: u64) {
        if let Some(pb) = &*self.bar.lock().unwrap() {
            pb.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.lock().unwrap().take() {
            pb.finish_and_clear();
        }
    }

    fn warn(&self, message: &str) {
        match &*self.bar.lock().unwrap() {
            Some(pb) => pb.suspend(|| eprintln!("warning: {message}")),
            None => eprintln!("warning: {message}"),
        }
    }
}
