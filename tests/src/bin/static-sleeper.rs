//! `static-sleeper`: the smallest useful sandbox payload, for the benchmark's raw-runsc
//! baseline. With the argument `sleep` it sleeps until killed; without, it exits at once.

#![forbid(unsafe_code)]

fn main() {
    if std::env::args().nth(1).as_deref() == Some("sleep") {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
