//! A tiny in-memory imitation of `iptables -t nat` and `ip6tables -t nat` (one table
//! each), enough to test apply/cleanup logic.

use std::cell::RefCell;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};

use crate::CommandRunner;

const BUILTIN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

type Chains = Vec<(String, Vec<String>)>;

#[derive(Default)]
pub struct FakeIptables {
    /// Binaries that "work"; others fail as if missing.
    pub working: Vec<&'static str>,
    /// IPv4: (chain, rules) in creation order; built-ins first.
    chains: RefCell<Chains>,
    /// IPv6, the same.
    chains6: RefCell<Chains>,
    /// What `/proc/net/if_inet6` holds; `None`: the file is missing (no IPv6 kernel).
    pub if_inet6: Option<String>,
    pub log: RefCell<Vec<String>>,
}

fn out(code: i32, stdout: String, stderr: &str) -> std::io::Result<Output> {
    Ok(Output {
        status: ExitStatus::from_raw(code << 8),
        stdout: stdout.into_bytes(),
        stderr: stderr.as_bytes().to_vec(),
    })
}

impl FakeIptables {
    pub fn new(working: &[&'static str]) -> Self {
        let builtin = || RefCell::new(BUILTIN.iter().map(|c| (c.to_string(), vec![])).collect());
        Self {
            working: working.to_vec(),
            chains: builtin(),
            chains6: builtin(),
            if_inet6: None,
            log: RefCell::default(),
        }
    }

    /// The same fake, with `/proc/net/if_inet6` holding `text`.
    pub fn with_if_inet6(mut self, text: &str) -> Self {
        self.if_inet6 = Some(text.to_string());
        self
    }

    /// The table `program` writes: ip6tables* the IPv6 one.
    fn table(&self, program: &str) -> &RefCell<Chains> {
        if program.starts_with("ip6tables") {
            &self.chains6
        } else {
            &self.chains
        }
    }

    /// Everything in the IPv4 table, as `-S` prints it.
    pub fn dump(&self) -> String {
        Self::dump_chains(&self.chains.borrow())
    }

    /// Everything in the IPv6 table, as `ip6tables -S` prints it.
    pub fn dump6(&self) -> String {
        Self::dump_chains(&self.chains6.borrow())
    }

    fn dump_chains(chains: &Chains) -> String {
        let mut s = String::new();
        for (c, _) in chains.iter() {
            if BUILTIN.contains(&c.as_str()) {
                s += &format!("-P {c} ACCEPT\n");
            } else {
                s += &format!("-N {c}\n");
            }
        }
        for (c, rules) in chains.iter() {
            for r in rules {
                s += &format!("-A {c} {r}\n");
            }
        }
        s
    }

    pub fn add_rule(&self, chain: &str, spec: &str) {
        let mut chains = self.chains.borrow_mut();
        if let Some((_, rules)) = chains.iter_mut().find(|(c, _)| c == chain) {
            rules.push(spec.to_string());
        }
    }
}

impl CommandRunner for FakeIptables {
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<Output> {
        self.log.borrow_mut().push(self.command_line(program, args));
        if !self.working.contains(&program) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found",
            ));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rest = match args.as_slice() {
            ["-w", "-t", "nat", rest @ ..] => rest,
            ["-t", "nat", ..] if program.ends_with("-save") => {
                return out(0, Self::dump_chains(&self.table(program).borrow()), "");
            }
            _ => return out(2, String::new(), "unsupported"),
        };
        let mut chains = self.table(program).borrow_mut();
        let find = |chains: &Vec<(String, Vec<String>)>, name: &str| {
            chains.iter().position(|(c, _)| c == name)
        };
        match rest {
            ["-S"] => out(0, Self::dump_chains(&chains), ""),
            ["-S", chain] => match find(&chains, chain) {
                Some(i) => {
                    let (c, rules) = &chains[i];
                    let mut s = if BUILTIN.contains(&c.as_str()) {
                        format!("-P {c} ACCEPT\n")
                    } else {
                        format!("-N {c}\n")
                    };
                    for r in rules {
                        s += &format!("-A {c} {r}\n");
                    }
                    out(0, s, "")
                }
                None => out(1, String::new(), "No chain"),
            },
            ["-N", chain] => {
                if find(&chains, chain).is_some() {
                    return out(1, String::new(), "Chain already exists.");
                }
                chains.push((chain.to_string(), vec![]));
                out(0, String::new(), "")
            }
            ["-F", chain] => match find(&chains, chain) {
                Some(i) => {
                    chains[i].1.clear();
                    out(0, String::new(), "")
                }
                None => out(1, String::new(), "No chain"),
            },
            ["-X", chain] => {
                let referenced = chains
                    .iter()
                    .any(|(_, rs)| rs.iter().any(|r| r.ends_with(&format!("-j {chain}"))));
                match find(&chains, chain) {
                    Some(i) if chains[i].1.is_empty() && !referenced => {
                        chains.remove(i);
                        out(0, String::new(), "")
                    }
                    _ => out(1, String::new(), "Directory not empty / busy"),
                }
            }
            [op @ ("-A" | "-C" | "-D" | "-I"), chain, spec @ ..] => {
                let Some(i) = find(&chains, chain) else {
                    return out(1, String::new(), "No chain");
                };
                let (spec, at_top) = match (*op, spec) {
                    ("-I", ["1", s @ ..]) => (s, true),
                    (_, s) => (s, false),
                };
                let target = spec
                    .windows(2)
                    .find(|w| w[0] == "-j")
                    .map(|w| w[1].to_string())
                    .unwrap_or_default();
                if target.starts_with("TRELLIS_") && find(&chains, &target).is_none() {
                    return out(2, String::new(), "Couldn't load target");
                }
                let spec = spec.join(" ");
                let rules = &mut chains[i].1;
                match *op {
                    "-A" => rules.push(spec),
                    "-I" if at_top => rules.insert(0, spec),
                    "-C" if rules.contains(&spec) => {}
                    "-D" => match rules.iter().position(|r| *r == spec) {
                        Some(p) => {
                            rules.remove(p);
                        }
                        None => return out(1, String::new(), "Bad rule"),
                    },
                    _ => return out(1, String::new(), "Bad rule"),
                }
                out(0, String::new(), "")
            }
            _ => out(2, String::new(), "unsupported"),
        }
    }

    /// `iptables-restore -w --noflush`: the `nat` table only; a declared chain is
    /// created or flushed; nothing changes unless the whole input is good.
    fn run_with_input(
        &self,
        program: &str,
        args: &[String],
        input: &[u8],
    ) -> std::io::Result<Output> {
        self.log.borrow_mut().push(self.command_line(program, args));
        let works = program
            .strip_suffix("-restore")
            .is_some_and(|base| self.working.contains(&base));
        if !works {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found",
            ));
        }
        if args != ["-w", "--noflush"] {
            return out(2, String::new(), "unsupported");
        }
        let mut next = self.table(program).borrow().clone();
        let text = String::from_utf8_lossy(input);
        let mut committed = false;
        for line in text.lines() {
            let find = |chains: &Vec<(String, Vec<String>)>, name: &str| {
                chains.iter().position(|(c, _)| c == name)
            };
            if line == "*nat" {
                continue;
            } else if line == "COMMIT" {
                committed = true;
            } else if let Some(decl) = line.strip_prefix(':') {
                let Some(chain) = decl.split_whitespace().next() else {
                    return out(1, String::new(), "bad chain line");
                };
                match find(&next, chain) {
                    Some(i) => next[i].1.clear(),
                    None => next.push((chain.to_string(), vec![])),
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let Some((chain, spec)) = rule.split_once(' ') else {
                    return out(1, String::new(), "bad rule line");
                };
                let target = spec.split(' ').skip_while(|w| *w != "-j").nth(1);
                if target.is_some_and(|t| t.starts_with("TRELLIS_") && find(&next, t).is_none()) {
                    return out(2, String::new(), "Couldn't load target");
                }
                let Some(i) = find(&next, chain) else {
                    return out(1, String::new(), "No chain");
                };
                next[i].1.push(spec.to_string());
            } else {
                return out(2, String::new(), "unsupported line");
            }
        }
        if !committed {
            return out(1, String::new(), "no COMMIT");
        }
        *self.table(program).borrow_mut() = next;
        out(0, String::new(), "")
    }

    fn read_file(&self, path: &str) -> std::io::Result<String> {
        match (&self.if_inet6, path) {
            (Some(text), crate::IF_INET6) => Ok(text.clone()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            )),
        }
    }
}
