//! Running iptables: on the host, or inside a network namespace, and picking a backend.

use std::fmt;
use std::process::{Command, Output};

use crate::InitError;

/// Which iptables binaries to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-nft` if it works here, else `iptables-legacy`, else plain `iptables`.
    #[default]
    Auto,
    /// `iptables-nft` (the nf_tables kernel API).
    Nft,
    /// `iptables-legacy` (the x_tables kernel API).
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "nft" | "nftables" | "iptables-nft" => Ok(Backend::Nft),
            "legacy" | "iptables-legacy" => Ok(Backend::Legacy),
            other => Err(InitError::Config(format!(
                "unknown iptables backend `{other}` (expected auto, nft or legacy)"
            ))),
        }
    }
}

impl Backend {
    /// The binaries this backend may use, in order of preference.
    pub fn candidates(self) -> &'static [&'static str] {
        match self {
            Backend::Auto => &["iptables-nft", "iptables-legacy", "iptables"],
            Backend::Nft => &["iptables-nft"],
            Backend::Legacy => &["iptables-legacy"],
        }
    }

    /// Finds the first candidate binary that works through `runner` (`-t nat -S` succeeds).
    pub fn resolve(self, runner: &dyn CommandRunner) -> Result<Iptables, InitError> {
        let mut detail = String::from("nothing tried");
        for bin in self.candidates() {
            let ipt = Iptables {
                binary: (*bin).to_string(),
            };
            match ipt.probe(runner) {
                Ok(()) => {
                    tracing::debug!(binary = %bin, backend = %self, "iptables backend chosen");
                    return Ok(ipt);
                }
                Err(why) => detail = why,
            }
            tracing::debug!(binary = %bin, %detail, "iptables binary not usable");
        }
        Err(InitError::NoIptables {
            tried: self.candidates().join(", "),
            detail,
        })
    }
}

/// A resolved iptables binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iptables {
    /// `iptables-nft`, `iptables-legacy` or `iptables`.
    pub binary: String,
}

impl Iptables {
    /// The IPv6 binary of the same backend: `iptables-nft` gives `ip6tables-nft`, so
    /// both families live in the same kernel API.
    pub fn ip6_counterpart(&self) -> Iptables {
        let binary = match self.binary.strip_prefix("iptables") {
            Some(rest) => format!("ip6tables{rest}"),
            None => self.binary.clone(),
        };
        Iptables { binary }
    }

    /// Whether the binary runs here and has a nat table (`-w -t nat -S` succeeds);
    /// else what it said.
    pub fn probe(&self, runner: &dyn CommandRunner) -> Result<(), String> {
        let args = ["-w", "-t", "nat", "-S"].map(String::from);
        match runner.run(&self.binary, &args) {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "`{}`: {} {}",
                runner.command_line(&self.binary, &args),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!(
                "`{}`: {e}",
                runner.command_line(&self.binary, &args)
            )),
        }
    }

    /// The matching `*-save` binary (`iptables-nft-save`, ...).
    pub fn save_binary(&self) -> String {
        format!("{}-save", self.binary)
    }

    /// The matching `*-restore` binary (`iptables-nft-restore`, ...).
    pub fn restore_binary(&self) -> String {
        format!("{}-restore", self.binary)
    }
}

/// Runs a program with arguments and waits for it. `apply_in`/`cleanup_in` go through
/// this, so the rules can be written on the host, inside a network namespace, or into a
/// fake in tests.
pub trait CommandRunner {
    /// Runs `program args...` to completion, capturing stdout and stderr.
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output>;

    /// Like [`CommandRunner::run`], with `input` on the program's standard input
    /// (for `iptables-restore`).
    fn run_with_input(
        &self,
        program: &str,
        args: &[String],
        input: &[u8],
    ) -> std::io::Result<Output>;

    /// The contents of a kernel file such as `/proc/net/if_inet6`, as seen from where
    /// the commands run. `NotFound` when the file does not exist there.
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    /// The full command line as it would be run (for logs and errors).
    fn command_line(&self, program: &str, args: &[String]) -> String {
        let mut s = program.to_string();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// Runs commands on this machine, optionally inside a named network namespace
/// (`ip netns exec NAME program args...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemRunner {
    /// The network namespace (as listed by `ip netns list`), or `None` for the current one.
    pub netns: Option<String>,
}

impl SystemRunner {
    /// Runs in the current network namespace.
    pub fn host() -> Self {
        Self { netns: None }
    }

    /// Runs inside the named network namespace via `ip netns exec`.
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
        }
    }
}

impl CommandRunner for SystemRunner {
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args).stdin(std::process::Stdio::null()).output()
    }

    fn run_with_input(
        &self,
        program: &str,
        args: &[String],
        input: &[u8],
    ) -> std::io::Result<Output> {
        use std::io::Write;
        use std::process::Stdio;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The input is a few KB at most: written whole before reading the output.
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input)?;
        }
        child.wait_with_output()
    }

    fn read_file(&self, path: &str) -> std::io::Result<String> {
        let Some(ns) = &self.netns else {
            return std::fs::read_to_string(path);
        };
        // /proc/net is per network namespace: read it from inside.
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", path])
            .stdin(std::process::Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false if stderr.contains("No such file") => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{path}: {}", stderr.trim()),
            )),
            false => Err(std::io::Error::other(format!(
                "reading {path} in netns {ns}: {}",
                stderr.trim()
            ))),
        }
    }

    fn command_line(&self, program: &str, args: &[String]) -> String {
        let mut s = match &self.netns {
            Some(ns) => format!("ip netns exec {ns} {program}"),
            None => program.to_string(),
        };
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}
