//! What the benchmark ran on: cores, CPU model, kernel, toolchain and OpenSSH versions, load.
//! Best effort: anything that cannot be read is `None`, never an error.

use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs this process may run on.
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub rustc: Option<String>,
    pub openssh: Option<String>,
    /// `/proc/loadavg`'s 1-minute figure when the run started.
    pub load_1m: Option<f64>,
}

impl Machine {
    pub fn detect() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| cpu_model(&s)),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| format!("Linux {}", s.trim())),
            rustc: command_line("rustc", &["-V"]),
            openssh: command_line("ssh", &["-V"]),
            load_1m: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok()),
        }
    }
}

/// The first `model name` line of /proc/cpuinfo (x86), else `Model`/`CPU part` (Arm).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    ["model name", "Model", "Hardware"]
        .iter()
        .find_map(|field| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == *field && !v.trim().is_empty()).then(|| v.trim().to_string())
            })
        })
}

/// First non-empty line a version command prints (stdout, else stderr: `ssh -V` uses stderr).
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    [out.stdout, out.stderr].iter().find_map(|b| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_from_cpuinfo() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(
            cpu_model(x86).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
        let m = Machine::detect();
        assert!(m.cores >= 1);
    }
}
