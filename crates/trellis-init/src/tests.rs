//! Pure tests: the plan, the dry-run text, and apply/cleanup against a fake iptables.

use clap::Parser;

use crate::fake::FakeIptables;
use crate::*;

fn lines(cfg: &InitConfig) -> Vec<String> {
    plan(cfg).iter().map(ToString::to_string).collect()
}

#[test]
fn default_plan_matches_the_contract() {
    let got = lines(&InitConfig::default());
    let want = [
        "-A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15001 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15006 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
        "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A TRELLIS_OUTPUT -o lo -j RETURN",
        "-A TRELLIS_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT",
        "-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-I PREROUTING 1 -p tcp -j TRELLIS_INBOUND",
        "-I OUTPUT 1 -p tcp -j TRELLIS_OUTPUT",
    ];
    assert_eq!(got, want);
    let rules = plan(&InitConfig::default());
    assert!(rules.iter().all(|r| r.table == "nat"));
    assert_eq!(rules.iter().filter(|r| r.kind == RuleKind::Hook).count(), 2);
}

#[test]
fn exclusions_gid_and_dedup() {
    let cfg = InitConfig {
        proxy_gid: Some(1337),
        outbound_port: 16001,
        inbound_port: 16006,
        proxy_ports: vec![15000, 15000],
        exclude_inbound_ports: vec![22, 15000, 22],
        exclude_outbound_ports: vec![5432, 5432],
        exclude_outbound_cidrs: parse_cidrs("10.0.0.0/8,10.0.0.0/8,169.254.169.254").unwrap(),
        ..InitConfig::default()
    };
    let got = lines(&cfg);
    let inbound: Vec<_> = got
        .iter()
        .filter(|l| l.contains("TRELLIS_INBOUND -p tcp --dport"))
        .collect();
    assert_eq!(inbound.len(), 2, "{inbound:?}");
    assert!(got.contains(&"-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN".to_string()));
    assert!(got.contains(&"-A TRELLIS_OUTPUT -m owner --gid-owner 1337 -j RETURN".to_string()));
    assert!(got.contains(&"-A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN".to_string()));
    assert!(got.contains(&"-A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN".to_string()));
    assert!(got.contains(&"-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN".to_string()));
    assert_eq!(got.iter().filter(|l| l.contains("5432")).count(), 1);
    assert_eq!(got.iter().filter(|l| l.contains("10.0.0.0/8")).count(), 1);
    assert!(got.contains(&"-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 16001".to_string()));
    assert!(
        got.contains(&"-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006".to_string())
    );
    // The catch-all jump is the last rule of TRELLIS_OUTPUT.
    let last_output = got
        .iter()
        .rfind(|l| l.starts_with("-A TRELLIS_OUTPUT"))
        .unwrap();
    assert_eq!(last_output, "-A TRELLIS_OUTPUT -j TRELLIS_REDIRECT");
}

#[test]
fn dry_run_text_is_restore_like() {
    let text = dry_run_text(&InitConfig::default());
    assert!(text.contains("# IPv4 (iptables-restore)"), "{text}");
    assert!(text.contains("# IPv6 (ip6tables-restore)"), "{text}");
    let (v4, v6) = text.split_once("# IPv6 (").unwrap();
    for (part, family) in [(v4, IpFamily::V4), (v6, IpFamily::V6)] {
        let body: Vec<&str> = part
            .lines()
            .skip_while(|l| *l != "*nat")
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(body.first(), Some(&"*nat"));
        assert_eq!(body.last(), Some(&"COMMIT"));
        for chain in OWN_CHAINS {
            assert!(
                body.contains(&format!(":{chain} - [0:0]").as_str()),
                "{chain}"
            );
        }
        assert_eq!(
            body.len(),
            1 + 4 + plan_for(&InitConfig::default(), family).len() + 1
        );
    }
    assert!(
        v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"),
        "{v6}"
    );
}

#[test]
fn validate_rejects_zero_ports() {
    let cfg = InitConfig {
        outbound_port: 0,
        ..InitConfig::default()
    };
    assert!(matches!(cfg.validate(), Err(InitError::Config(_))));
    let cfg = InitConfig {
        exclude_inbound_ports: vec![0],
        ..InitConfig::default()
    };
    assert!(matches!(cfg.validate(), Err(InitError::BadPort { .. })));
}

#[test]
fn apply_twice_leaves_one_set_and_cleanup_removes_all() {
    let fake = FakeIptables::new(&["iptables-nft"]);
    // Something else already in OUTPUT stays first-class but below our hook.
    fake.add_rule(
        "OUTPUT",
        "-d 10.96.0.10/32 -p tcp -j DNAT --to-destination 10.244.0.3:80",
    );
    let cfg = InitConfig::default();
    let ipt = apply_in(&cfg, &fake).unwrap();
    assert_eq!(ipt.binary, "iptables-nft");
    let once = fake.dump();
    apply_in(&cfg, &fake).unwrap();
    assert_eq!(fake.dump(), once);
    assert_eq!(
        once.matches("-A PREROUTING -p tcp -j TRELLIS_INBOUND")
            .count(),
        1
    );
    assert_eq!(
        once.matches("-A OUTPUT -p tcp -j TRELLIS_OUTPUT").count(),
        1
    );
    let output: Vec<&str> = once
        .lines()
        .filter(|l| l.starts_with("-A OUTPUT"))
        .collect();
    assert_eq!(
        output[0], "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        "hook first"
    );
    // A changed config replaces the chain contents.
    let cfg2 = InitConfig {
        exclude_outbound_ports: vec![5432],
        ..cfg.clone()
    };
    apply_in(&cfg2, &fake).unwrap();
    let changed = fake.dump();
    assert!(changed.contains("--dport 5432"));
    assert_eq!(changed.matches("-j TRELLIS_REDIRECT").count(), 1);

    cleanup_in(Backend::Auto, &fake).unwrap();
    let after = fake.dump();
    assert!(!after.contains("TRELLIS"), "{after}");
    assert!(after.contains("DNAT"), "foreign rules stay");
    // Nothing left: still fine.
    cleanup_in(Backend::Auto, &fake).unwrap();
}

#[test]
fn apply_removes_duplicate_hooks() {
    let fake = FakeIptables::new(&["iptables-legacy"]);
    let cfg = InitConfig {
        backend: Backend::Legacy,
        ..InitConfig::default()
    };
    apply_in(&cfg, &fake).unwrap();
    fake.add_rule("PREROUTING", "-p tcp -j TRELLIS_INBOUND");
    apply_in(&cfg, &fake).unwrap();
    assert_eq!(
        fake.dump()
            .matches("-A PREROUTING -p tcp -j TRELLIS_INBOUND")
            .count(),
        1
    );
}

#[test]
fn auto_falls_back_and_reports_missing_iptables() {
    let fake = FakeIptables::new(&["iptables"]);
    assert_eq!(Backend::Auto.resolve(&fake).unwrap().binary, "iptables");
    let err = Backend::Nft.resolve(&fake).unwrap_err();
    assert!(matches!(err, InitError::NoIptables { .. }), "{err}");
    assert!(err.to_string().contains("iptables-nft"), "{err}");
    let none = FakeIptables::new(&[]);
    assert!(matches!(
        apply_in(&InitConfig::default(), &none),
        Err(InitError::NoIptables { .. })
    ));
}

/// A runner whose iptables-restore fails on line 6, as the real one reports it: the
/// error carries the full command line and that rule.
struct FailingRestore(FakeIptables);

impl CommandRunner for FailingRestore {
    fn run(&self, program: &str, args: &[String]) -> std::io::Result<std::process::Output> {
        self.0.run(program, args)
    }

    fn run_with_input(
        &self,
        _program: &str,
        _args: &[String],
        _input: &[u8],
    ) -> std::io::Result<std::process::Output> {
        use std::os::unix::process::ExitStatusExt;
        Ok(std::process::Output {
            status: std::process::ExitStatus::from_raw(2 << 8),
            stdout: vec![],
            stderr: b"iptables-restore v1.8.9 (nf_tables): unknown option \"--uid-owner\"\nError occurred at line: 6\nTry `iptables-restore -h' for more information.\niptables-restore: line 6 failed\n".to_vec(),
        })
    }

    fn read_file(&self, path: &str) -> std::io::Result<String> {
        self.0.read_file(path)
    }

    fn command_line(&self, program: &str, args: &[String]) -> String {
        format!("ip netns exec test {program} {}", args.join(" "))
    }
}

#[test]
fn command_errors_carry_command_rule_and_stderr() {
    let runner = FailingRestore(FakeIptables::new(&["iptables-nft"]));
    let before = runner.0.dump();
    let err = apply_in(&InitConfig::default(), &runner).unwrap_err();
    // Nothing was half-written.
    assert_eq!(runner.0.dump(), before);
    match &err {
        InitError::Command {
            command,
            rule,
            stderr,
            status,
        } => {
            assert_eq!(
                command,
                "ip netns exec test iptables-nft-restore -w --noflush"
            );
            assert_eq!(rule, "-A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN");
            assert!(stderr.contains("unknown option"));
            assert_eq!(status.code(), Some(2));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn system_runner_command_lines() {
    let args = vec!["-w".to_string(), "-S".to_string()];
    assert_eq!(
        SystemRunner::host().command_line("iptables", &args),
        "iptables -w -S"
    );
    assert_eq!(
        SystemRunner::in_netns("pod-a").command_line("iptables", &args),
        "ip netns exec pod-a iptables -w -S"
    );
    let ipt = Iptables {
        binary: "iptables-legacy".into(),
    };
    assert_eq!(ipt.save_binary(), "iptables-legacy-save");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

#[test]
fn cli_args_build_the_config() {
    let cli = Cli::try_parse_from([
        "init",
        "--exclude-outbound-cidrs",
        "10.0.0.0/8,192.168.0.0/16",
        "--exclude-inbound-ports",
        "22",
        "--backend",
        "legacy",
        "--proxy-gid",
        "1337",
    ])
    .unwrap();
    let cfg = cli.init.config();
    assert_eq!(cfg.exclude_outbound_cidrs.len(), 2);
    assert_eq!(cfg.exclude_inbound_ports, vec![22]);
    assert_eq!(cfg.backend, Backend::Legacy);
    assert_eq!(cfg.proxy_ports, DEFAULT_PROXY_PORTS.to_vec());
    assert_eq!(cfg.proxy_gid, Some(1337));
    let dry = Cli::try_parse_from(["init", "--dry-run"]).unwrap();
    assert!(dry.init.execute().unwrap().contains("*nat"));

    let err = Cli::try_parse_from(["init", "--exclude-outbound-cidrs", "10.0.0.0/40"])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("10.0.0.0/40") && err.contains("larger than 32"),
        "{err}"
    );
    let err = Cli::try_parse_from(["init", "--outbound-port", "0"])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("port 0"), "{err}");
}

/// `/proc/net/if_inet6` of a dual-stack pod: a unique-local address on eth0, plus the
/// link-local and loopback ones every IPv6 interface has.
const DUAL_STACK_IF_INET6: &str = "\
fd00001002440000000000000000000a 02 40 00 80     eth0
fe80000000000000a8c1abfffe3e5f0a 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
";

/// The same pod without a routable IPv6 address.
const LINK_LOCAL_ONLY_IF_INET6: &str = "\
fe80000000000000a8c1abfffe3e5f0a 02 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
";

#[test]
fn ipv6_plan_mirrors_ipv4_with_its_own_loopback() {
    let cfg = InitConfig {
        proxy_gid: Some(1337),
        exclude_inbound_ports: vec![22],
        exclude_outbound_ports: vec![5432],
        exclude_outbound_cidrs: parse_cidrs("169.254.169.254").unwrap(),
        ..InitConfig::default()
    };
    let v4: Vec<String> = plan_for(&cfg, IpFamily::V4)
        .iter()
        .map(ToString::to_string)
        .collect();
    let v6: Vec<String> = plan_for(&cfg, IpFamily::V6)
        .iter()
        .map(ToString::to_string)
        .collect();
    // IPv4 CIDRs have no place in ip6tables; everything else is the same rule.
    let expected: Vec<String> = v4
        .iter()
        .filter(|l| !l.contains("169.254.169.254"))
        .map(|l| l.replace("127.0.0.1/32", "::1/128"))
        .collect();
    assert_eq!(v6, expected);
    assert_eq!(v6.len() + 1, v4.len());
    for needle in [
        "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A TRELLIS_OUTPUT -d ::1/128 -j RETURN",
        "-A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN",
        "-A TRELLIS_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(v6.contains(&needle.to_string()), "{needle} in {v6:?}");
    }
    assert_eq!(plan(&cfg), plan_for(&cfg, IpFamily::V4));
}

#[test]
fn routable_ipv6_addresses_are_global_and_unique_local_off_loopback() {
    let got = routable_addresses(DUAL_STACK_IF_INET6);
    assert_eq!(
        got,
        vec![PodIpv6 {
            addr: "fd00:10:244::a".parse().unwrap(),
            interface: "eth0".into(),
        }]
    );
    assert!(routable_addresses(LINK_LOCAL_ONLY_IF_INET6).is_empty());
    // A global address on lo does not make the pod reachable; junk is skipped.
    let odd = "20010db8000000000000000000000001 01 80 00 80 lo\nnot a line\nzz 1 2 3 4 eth0\n";
    assert!(routable_addresses(odd).is_empty());
    assert_eq!(
        routable_addresses("20010db8000000000000000000000002 03 40 00 00 net1\n")[0].to_string(),
        "2001:db8::2 on net1"
    );
}

#[test]
fn ip6tables_matches_the_ipv4_backend() {
    for (v4, v6) in [
        ("iptables-nft", "ip6tables-nft"),
        ("iptables-legacy", "ip6tables-legacy"),
        ("iptables", "ip6tables"),
    ] {
        let ipt = Iptables { binary: v4.into() };
        assert_eq!(ipt.ip6_counterpart().binary, v6);
        assert_eq!(
            ipt.ip6_counterpart().restore_binary(),
            format!("{v6}-restore")
        );
    }
}

#[test]
fn dual_stack_pod_gets_the_same_rules_in_ip6tables_and_cleanup_removes_both() {
    for (backend, v4, v6) in [
        (Backend::Nft, "iptables-nft", "ip6tables-nft"),
        (Backend::Legacy, "iptables-legacy", "ip6tables-legacy"),
    ] {
        let fake = FakeIptables::new(&[v4, v6]).with_if_inet6(DUAL_STACK_IF_INET6);
        let cfg = InitConfig {
            backend,
            ..InitConfig::default()
        };
        apply_in(&cfg, &fake).unwrap();
        let once = fake.dump6();
        assert!(
            fake.log
                .borrow()
                .contains(&format!("{v6}-restore -w --noflush")),
            "one transaction: {:?}",
            fake.log.borrow()
        );
        for rule in plan_for(&cfg, IpFamily::V6) {
            let line = format!("-A {} {}", rule.chain, rule.spec());
            assert_eq!(once.matches(&line).count(), 1, "{line} in\n{once}");
        }
        assert!(
            !fake.dump().contains("::1"),
            "IPv6 rules stay out of iptables"
        );
        apply_in(&cfg, &fake).unwrap();
        assert_eq!(fake.dump6(), once, "second apply changed ip6tables");

        cleanup_in(backend, &fake).unwrap();
        assert!(!fake.dump().contains("TRELLIS"));
        assert!(!fake.dump6().contains("TRELLIS"), "{}", fake.dump6());
    }
}

#[test]
fn missing_ip6tables_on_a_pod_with_ipv6_fails_and_writes_nothing() {
    let fake = FakeIptables::new(&["iptables-nft"]).with_if_inet6(DUAL_STACK_IF_INET6);
    let before = fake.dump();
    let err = apply_in(&InitConfig::default(), &fake).unwrap_err();
    assert!(matches!(err, InitError::NoIp6tables { .. }), "{err}");
    let text = err.to_string();
    for needle in [
        "fd00:10:244::a on eth0",
        "ip6tables-nft",
        "refusing",
        "not found",
    ] {
        assert!(text.contains(needle), "`{needle}` in {text}");
    }
    assert_eq!(fake.dump(), before, "IPv4 rules must not be written alone");
    assert!(
        !fake.log.borrow().iter().any(|c| c.contains("-restore")),
        "{:?}",
        fake.log.borrow()
    );

    // ip6tables present but without a nat table counts as missing.
    struct NoNat6(FakeIptables);
    impl CommandRunner for NoNat6 {
        fn run(&self, program: &str, args: &[String]) -> std::io::Result<std::process::Output> {
            use std::os::unix::process::ExitStatusExt;
            if program.starts_with("ip6tables") {
                return Ok(std::process::Output {
                    status: std::process::ExitStatus::from_raw(3 << 8),
                    stdout: vec![],
                    stderr: b"ip6tables v1.8.9 (nf_tables): table 'nat' does not exist".to_vec(),
                });
            }
            self.0.run(program, args)
        }
        fn run_with_input(
            &self,
            program: &str,
            args: &[String],
            input: &[u8],
        ) -> std::io::Result<std::process::Output> {
            self.0.run_with_input(program, args, input)
        }
        fn read_file(&self, path: &str) -> std::io::Result<String> {
            self.0.read_file(path)
        }
    }
    let runner = NoNat6(FakeIptables::new(&["iptables-nft"]).with_if_inet6(DUAL_STACK_IF_INET6));
    let err = apply_in(&InitConfig::default(), &runner).unwrap_err();
    assert!(
        err.to_string().contains("table 'nat' does not exist"),
        "{err}"
    );
}

#[test]
fn without_routable_ipv6_missing_ip6tables_only_skips_ipv6() {
    // IPv6 in the kernel but only link-local addresses: IPv4 rules, no failure.
    let fake = FakeIptables::new(&["iptables-nft"]).with_if_inet6(LINK_LOCAL_ONLY_IF_INET6);
    apply_in(&InitConfig::default(), &fake).unwrap();
    assert!(fake.dump().contains("TRELLIS_REDIRECT"));
    // No IPv6 in the kernel at all: the same.
    let fake = FakeIptables::new(&["iptables-nft"]);
    apply_in(&InitConfig::default(), &fake).unwrap();
    assert!(fake.dump().contains("TRELLIS_REDIRECT"));
    // With a working ip6tables the rules are written even without an address yet.
    let fake = FakeIptables::new(&["iptables-nft", "ip6tables-nft"])
        .with_if_inet6(LINK_LOCAL_ONLY_IF_INET6);
    apply_in(&InitConfig::default(), &fake).unwrap();
    assert!(fake.dump6().contains("TRELLIS_REDIRECT"));
}
