//! Processes inside pods: long-running ones with a log file, and one-shot commands with
//! a time limit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How often log files and exits are polled.
const POLL: Duration = Duration::from_millis(20);

/// Builds `ip netns exec <ns> [setpriv --reuid U --regid U --clear-groups --] program args`.
///
/// `ip netns exec` needs root to enter the namespace, so a UID cannot be set on the
/// `ip` process itself (`CommandExt::uid`); `setpriv` (util-linux) drops to it after.
pub fn netns_command(netns: &str, uid: Option<u32>, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]);
    if let Some(uid) = uid {
        let id = uid.to_string();
        cmd.args([
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--",
        ]);
    }
    cmd.arg(program).args(args);
    cmd
}

/// Runs `cmd` to completion, killing it after `timeout`. Output is captured.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<Output> {
    run_with_input(cmd, None, timeout)
}

/// [`run_with_timeout`] with `input` written to the command's stdin (none: stdin is
/// `/dev/null`).
pub fn run_with_input(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {desc}"))?;
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // From a thread, so a child that stops reading cannot hold us past the deadline.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().with_context(|| format!("wait {desc}"))? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            bail!(
                "{desc} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err).trim()
            );
        }
        std::thread::sleep(POLL);
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// A process started by [`crate::TestBed::spawn`]. The bed kills it on drop; dropping
/// the handle does not.
#[derive(Clone)]
pub struct ChildHandle {
    pub(crate) child: Arc<Mutex<Child>>,
    /// The process id (of the program itself: `ip netns exec` and `setpriv` exec it).
    pub pid: u32,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    /// What it is, for messages: `<pod>: <program> <args>`.
    pub description: String,
}

impl std::fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildHandle")
            .field("pid", &self.pid)
            .field("log_path", &self.log_path)
            .field("description", &self.description)
            .finish()
    }
}

impl ChildHandle {
    pub(crate) fn new(child: Child, log_path: PathBuf, description: String) -> Self {
        Self {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            log_path,
            description,
        }
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut child = self
            .child
            .lock()
            .map_err(|_| anyhow!("child lock poisoned"))?;
        Ok(child.try_wait()?)
    }

    /// Waits until its log contains `needle` and returns that line; fails if it exits
    /// first or `timeout` passes. Servers print `listening on ADDR` when ready.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing `{needle}`; log:\n{log}",
                    self.description
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print `{needle}` within {timeout:?}; log:\n{log}",
                    self.description
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the `listening on ADDR` line and returns ADDR.
    pub fn wait_listening(&self, timeout: Duration) -> Result<String> {
        let line = self.wait_for_log("listening on ", timeout)?;
        Ok(line
            .split("listening on ")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    /// Kills it (SIGKILL) and reaps it; fine if it already exited.
    pub fn kill(&self) -> Result<()> {
        let mut child = self
            .child
            .lock()
            .map_err(|_| anyhow!("child lock poisoned"))?;
        if child.try_wait()?.is_none() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }
}

/// A log file's content, or a note why it cannot be read.
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}
