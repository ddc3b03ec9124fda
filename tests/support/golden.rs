//! Golden files: the one convention of every golden test (injection, manifests, translation,
//! the checked-in CRDs). Each case's output is compared with its golden file; a golden file
//! that is stale, missing, or left over from a case that no longer exists (an orphan) fails
//! the test with a diff and the command that updates them. With `UPDATE_GOLDEN=1` the stale
//! and missing ones are written and the orphans deleted instead.
//!
//! Shared by meshctl's and mesh-translate's tests (`#[path = ...] mod golden;`).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The environment variable that turns checking into updating (`UPDATE_GOLDEN=1`).
pub const UPDATE_ENV: &str = "UPDATE_GOLDEN";

/// Whether the golden files are to be rewritten rather than checked.
pub fn updating() -> bool {
    std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1")
}

/// Lines of diff shown per stale file.
const DIFF_LINES: usize = 80;

/// One golden test's files.
pub struct Goldens {
    update: bool,
    /// How to run the test (`cargo test --test manifest_golden`), for the failure message.
    command: String,
    checked: BTreeSet<PathBuf>,
    problems: Vec<String>,
}

impl Goldens {
    pub fn new(command: &str) -> Self {
        Goldens {
            update: updating(),
            command: command.to_string(),
            checked: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    /// Compares `got` with the golden file at `path` (or writes it, when updating).
    pub fn check(&mut self, path: &Path, got: &str) {
        self.checked.insert(path.to_path_buf());
        let want = std::fs::read_to_string(path).ok();
        if want.as_deref() == Some(got) {
            return;
        }
        if self.update {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).unwrap();
            }
            std::fs::write(path, got).unwrap();
            eprintln!("updated {}", path.display());
            return;
        }
        let Some(want) = want else {
            self.problems.push(format!("missing: {}", path.display()));
            return;
        };
        let diff = similar::TextDiff::from_lines(want.as_str(), got)
            .unified_diff()
            .header("golden", "got")
            .to_string();
        let mut lines: Vec<&str> = diff.lines().take(DIFF_LINES + 1).collect();
        if lines.len() > DIFF_LINES {
            lines[DIFF_LINES] = "(diff cut short)";
        }
        self.problems
            .push(format!("stale: {}\n{}", path.display(), lines.join("\n")));
    }

    /// Golden files in `dir` (names ending in `suffix`) that no case checked: left over from
    /// a case that no longer exists.
    pub fn orphans(&mut self, dir: &Path, suffix: &str) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut found: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .filter(|p| !self.checked.contains(p))
            .collect();
        found.sort();
        for p in found {
            if self.update {
                std::fs::remove_file(&p).unwrap();
                eprintln!("removed orphan {}", p.display());
            } else {
                self.problems.push(format!("orphan: {}", p.display()));
            }
        }
    }

    /// Fails the test when a golden file was stale, missing or an orphan.
    #[track_caller]
    pub fn finish(self) {
        assert!(
            self.problems.is_empty(),
            "golden files are not current ({UPDATE_ENV}=1 {} updates them):\n{}",
            self.command,
            self.problems.join("\n")
        );
    }
}
