//! An environment owned by a test is torn down when that test panics: no process that
//! mentions its work directory survives, and the directory is gone.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_testenv::TestEnv;

/// PIDs of processes whose command line mentions `dir/`.
fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn an_owned_environment_stops_when_its_test_panics() {
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let env = TestEnv::start().await.unwrap();
            eprintln!("owned env started in {:?}", env.startup_time());
            let version = env.client().unwrap().apiserver_version().await.unwrap();
            assert_eq!(version.git_version, "v1.36.3");
            *DIR.lock().unwrap() = Some(env.dir().to_owned());
            assert!(!processes_using(env.dir()).is_empty());
            panic!("a failing test, while the environment is up");
        })
    });
    assert!(outcome.is_err(), "the test body panicked");
    let dir = DIR.lock().unwrap().clone().expect("the env started");
    // Drop has already waited for every process; allow a moment for the kernel to reap.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_using(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_using(&dir),
        Vec::<u32>::new(),
        "no process survives"
    );
    assert!(!dir.exists(), "{} removed", dir.display());
}
