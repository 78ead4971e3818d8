//! Writing and removing the rules.

use std::process::Output;

use crate::plan::{IpFamily, NAT, OWN_CHAINS, RuleKind, plan_for};
use crate::pod_ipv6::{IF_INET6, routable_addresses};
use crate::runner::{Backend, CommandRunner, Iptables, SystemRunner};
use crate::{InitConfig, InitError};

/// The built-in chains Trellis hooks into.
const HOOK_CHAINS: [&str; 2] = ["PREROUTING", "OUTPUT"];
/// Upper bound on deletions per cleanup, so a misbehaving iptables cannot loop us forever.
const MAX_DELETES: usize = 256;

/// Writes the rules for `cfg` in the current network namespace. See [`apply_in`].
pub fn apply(cfg: &InitConfig) -> Result<(), InitError> {
    apply_in(cfg, &SystemRunner::host()).map(|_| ())
}

/// Writes the rules for `cfg` through `runner` (for example inside a network namespace),
/// for IPv4 and IPv6, and returns the IPv4 iptables binary that was used (its
/// [`Iptables::ip6_counterpart`] wrote the IPv6 rules, if any).
///
/// Idempotent: Trellis's own chains are (re)written in one `iptables-restore
/// --noflush` transaction per family, which creates or flushes each declared chain and
/// fills it atomically, so a re-apply never leaves a moment without redirection and a
/// failed one changes nothing. Then the jumps from PREROUTING and OUTPUT are inserted at
/// the top only when `-C` does not find them (extra copies are removed). Running it
/// twice leaves one set.
///
/// IPv6 fails closed: the ip6tables matching the IPv4 backend writes the same rules;
/// if it does not work and the Pod has a global or unique-local IPv6 address, nothing
/// is written and [`InitError::NoIp6tables`] says why. Without such an address (or
/// without IPv6 in the kernel) the IPv6 rules are skipped with a log line.
pub fn apply_in(cfg: &InitConfig, runner: &dyn CommandRunner) -> Result<Iptables, InitError> {
    cfg.validate()?;
    let v4 = cfg.backend.resolve(runner)?;
    // Decided before anything is written, so a refusal leaves the Pod untouched.
    let v6 = ipv6_binary(&v4, runner)?;
    write_family(cfg, IpFamily::V4, &Ipt::new(runner, v4.clone()))?;
    if let Some(v6) = v6 {
        write_family(cfg, IpFamily::V6, &Ipt::new(runner, v6))?;
    }
    Ok(v4)
}

/// The ip6tables to write IPv6 rules with, `None` when IPv6 needs none, or the refusal.
fn ipv6_binary(v4: &Iptables, runner: &dyn CommandRunner) -> Result<Option<Iptables>, InitError> {
    let addresses = match runner.read_file(IF_INET6) {
        Ok(text) => Ok(routable_addresses(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(
                file = IF_INET6,
                "IPv6 is disabled in this kernel: no ip6tables rules"
            );
            return Ok(None);
        }
        // Unknown counts as present: fail closed.
        Err(e) => Err(format!("unknown: {e}")),
    };
    let v6 = v4.ip6_counterpart();
    let detail = match v6.probe(runner) {
        Ok(()) => return Ok(Some(v6)),
        Err(detail) => detail,
    };
    match addresses {
        Ok(list) if list.is_empty() => {
            tracing::warn!(
                binary = %v6.binary,
                %detail,
                "ip6tables does not work and the pod has no global IPv6 address: IPv6 rules skipped"
            );
            Ok(None)
        }
        Ok(list) => Err(InitError::NoIp6tables {
            binary: v6.binary,
            addresses: list
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            detail,
        }),
        Err(unknown) => Err(InitError::NoIp6tables {
            binary: v6.binary,
            addresses: unknown,
            detail,
        }),
    }
}

/// One family's chains in one transaction, then its hooks.
fn write_family(cfg: &InitConfig, family: IpFamily, ipt: &Ipt<'_>) -> Result<(), InitError> {
    let rules = plan_for(cfg, family);
    ipt.restore(&restore_input(&rules))?;
    for rule in rules.iter().filter(|r| r.kind == RuleKind::Hook) {
        let mut check = vec!["-C", rule.chain.as_str()];
        check.extend(rule.args.iter().map(String::as_str));
        if ipt.try_run(&check)?.status.success() {
            tracing::debug!(chain = %rule.chain, rule = %rule, "hook already present");
        } else {
            let mut insert = vec!["-I", rule.chain.as_str(), "1"];
            insert.extend(rule.args.iter().map(String::as_str));
            ipt.run(&insert, &rule.to_string())?;
        }
        // Remove extra identical copies, e.g. left by an older tool.
        let line = format!("-A {} {}", rule.chain, rule.spec());
        let copies = ipt
            .list(&rule.chain)?
            .iter()
            .filter(|l| **l == line)
            .count();
        for _ in 1..copies.min(MAX_DELETES) {
            let mut delete = vec!["-D", rule.chain.as_str()];
            delete.extend(rule.args.iter().map(String::as_str));
            ipt.run(&delete, &format!("remove duplicate {line}"))?;
        }
    }
    tracing::info!(
        binary = %ipt.ipt.binary,
        %family,
        rules = rules.len(),
        outbound_port = cfg.outbound_port,
        inbound_port = cfg.inbound_port,
        proxy_uid = cfg.proxy_uid,
        "traffic redirection rules applied"
    );
    Ok(())
}

/// Removes Trellis's jumps and chains from the current network namespace. See [`cleanup_in`].
pub fn cleanup(backend: Backend) -> Result<(), InitError> {
    cleanup_in(backend, &SystemRunner::host()).map(|_| ())
}

/// Removes every jump from PREROUTING/OUTPUT into a `TRELLIS_*` chain, then flushes and
/// deletes Trellis's chains, through `runner`, for IPv4 and (when its ip6tables works)
/// IPv6. Succeeds when there is nothing to remove. Returns the IPv4 binary.
pub fn cleanup_in(backend: Backend, runner: &dyn CommandRunner) -> Result<Iptables, InitError> {
    let v4 = backend.resolve(runner)?;
    cleanup_family(&Ipt::new(runner, v4.clone()))?;
    let v6 = v4.ip6_counterpart();
    match v6.probe(runner) {
        Ok(()) => cleanup_family(&Ipt::new(runner, v6))?,
        Err(detail) => tracing::debug!(%detail, "no ip6tables: no IPv6 rules to remove"),
    }
    Ok(v4)
}

fn cleanup_family(ipt: &Ipt<'_>) -> Result<(), InitError> {
    let mut deleted = 0usize;
    for chain in HOOK_CHAINS {
        for line in ipt.list(chain)? {
            let Some(rest) = line.strip_prefix(&format!("-A {chain} ")) else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let jumps_to_us = words
                .windows(2)
                .any(|w| w[0] == "-j" && w[1].starts_with("TRELLIS_"));
            if !jumps_to_us || rest.contains('"') || deleted >= MAX_DELETES {
                continue;
            }
            let mut delete = vec!["-D", chain];
            delete.extend(words.iter().copied());
            ipt.run(&delete, &line)?;
            deleted += 1;
        }
    }
    let existing = ipt.chains()?;
    let ours: Vec<&str> = OWN_CHAINS
        .into_iter()
        .filter(|c| existing.iter().any(|e| e == c))
        .collect();
    for chain in &ours {
        ipt.run(&["-F", chain], &format!("flush chain {chain}"))?;
    }
    for chain in &ours {
        ipt.run(&["-X", chain], &format!("delete chain {chain}"))?;
    }
    tracing::info!(
        binary = %ipt.ipt.binary,
        jumps_removed = deleted,
        chains_removed = ours.len(),
        "traffic redirection rules removed"
    );
    Ok(())
}

/// The nat table as `iptables-save -t nat` prints it, through `runner`.
pub fn save_nat_in(ipt: &Iptables, runner: &dyn CommandRunner) -> Result<String, InitError> {
    let save = ipt.save_binary();
    let args = vec!["-t".to_string(), NAT.to_string()];
    let command = runner.command_line(&save, &args);
    let out = runner
        .run(&save, &args)
        .map_err(|source| InitError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(InitError::Command {
            command,
            rule: "save nat table".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            status: out.status,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `iptables-restore` input that declares (so creates or flushes) Trellis's own
/// chains and fills them; the built-in chains are not declared, so `--noflush` leaves
/// them alone.
fn restore_input(rules: &[crate::plan::Rule]) -> String {
    let mut input = format!("*{NAT}\n");
    for chain in OWN_CHAINS {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in rules.iter().filter(|r| r.kind == RuleKind::Own) {
        input.push_str(&rule.to_string());
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    input
}

/// The input line iptables-restore names in "line N failed", else the whole input.
fn failed_line(input: &str, stderr: &str) -> String {
    let number = stderr
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok());
    match number.and_then(|n| input.lines().nth(n.checked_sub(1)?)) {
        Some(line) => line.to_string(),
        None => input.trim_end().replace('\n', "; "),
    }
}

/// One iptables binary bound to a runner, always `-w -t nat`.
struct Ipt<'a> {
    runner: &'a dyn CommandRunner,
    ipt: Iptables,
}

impl<'a> Ipt<'a> {
    fn new(runner: &'a dyn CommandRunner, ipt: Iptables) -> Self {
        Self { runner, ipt }
    }

    fn full_args(args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = ["-w", "-t", NAT].map(String::from).to_vec();
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// Runs; only failing to start is an error.
    fn try_run(&self, args: &[&str]) -> Result<Output, InitError> {
        let full = Self::full_args(args);
        let command = self.runner.command_line(&self.ipt.binary, &full);
        tracing::debug!(%command, "iptables");
        self.runner
            .run(&self.ipt.binary, &full)
            .map_err(|source| InitError::Spawn { command, source })
    }

    /// Runs; a non-zero exit is an error naming the rule.
    fn run(&self, args: &[&str], rule: &str) -> Result<Output, InitError> {
        let out = self.try_run(args)?;
        if out.status.success() {
            return Ok(out);
        }
        let full = Self::full_args(args);
        let err = InitError::Command {
            command: self.runner.command_line(&self.ipt.binary, &full),
            rule: rule.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            status: out.status,
        };
        tracing::warn!(error = %err, "iptables command failed");
        Err(err)
    }

    /// Applies `input` with `iptables-restore --noflush`: all of it or nothing.
    fn restore(&self, input: &str) -> Result<(), InitError> {
        let program = self.ipt.restore_binary();
        let args = ["-w", "--noflush"].map(String::from).to_vec();
        let command = self.runner.command_line(&program, &args);
        tracing::debug!(%command, "iptables-restore");
        let out = self
            .runner
            .run_with_input(&program, &args, input.as_bytes())
            .map_err(|source| InitError::Spawn {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let err = InitError::Command {
            command,
            rule: failed_line(input, &stderr),
            stderr,
            status: out.status,
        };
        tracing::warn!(error = %err, "iptables-restore failed");
        Err(err)
    }

    /// `-S [chain]` output lines.
    fn list(&self, chain: &str) -> Result<Vec<String>, InitError> {
        let out = self.run(&["-S", chain], &format!("list chain {chain}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect())
    }

    /// The user-defined chains of the nat table.
    fn chains(&self) -> Result<Vec<String>, InitError> {
        let out = self.run(&["-S"], "list nat table")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .map(|c| c.trim().to_string())
            .collect())
    }
}
