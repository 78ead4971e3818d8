//! Root tests: write the rules into fresh network namespaces with the real iptables
//! binaries. When not root or without netns, every test is reported as ignored in the
//! runner's summary (`harness = false`: `common::run_root_tests` decides at run time).

mod common;

use common::{Netns, have_binary, normalized_nat, run_root_tests};
use trellis_init::{
    Backend, InitConfig, OWN_CHAINS, SystemRunner, apply_in, cleanup_in, parse_cidrs, save_nat_in,
};

fn main() {
    run_root_tests(&[
        (
            "apply_twice_is_identical_and_cleanup_removes_everything",
            apply_twice_is_identical_and_cleanup_removes_everything,
        ),
        (
            "auto_backend_works_in_a_namespace",
            auto_backend_works_in_a_namespace,
        ),
    ]);
}

fn backends() -> Vec<(Backend, &'static str)> {
    [
        (Backend::Nft, "iptables-nft"),
        (Backend::Legacy, "iptables-legacy"),
    ]
    .into_iter()
    .filter(|(_, bin)| {
        let ok = have_binary(bin);
        if !ok {
            eprintln!("SKIPPED backend {bin}: binary not installed");
        }
        ok
    })
    .collect()
}

fn config(backend: Backend) -> InitConfig {
    InitConfig {
        backend,
        proxy_gid: Some(1337),
        exclude_inbound_ports: vec![22],
        exclude_outbound_ports: vec![5432],
        exclude_outbound_cidrs: parse_cidrs("169.254.0.0/16").expect("cidr"),
        ..InitConfig::default()
    }
}

fn apply_twice_is_identical_and_cleanup_removes_everything() {
    let list = backends();
    assert!(
        !list.is_empty(),
        "neither iptables-nft nor iptables-legacy is installed"
    );
    for (backend, bin) in list {
        let ns = Netns::create();
        let runner = SystemRunner::in_netns(&ns.name);
        let cfg = config(backend);
        let ipt = apply_in(&cfg, &runner).expect("first apply");
        assert_eq!(ipt.binary, bin);
        let once = normalized_nat(&ns.name, &ipt.save_binary());
        apply_in(&cfg, &runner).expect("second apply");
        let twice = normalized_nat(&ns.name, &ipt.save_binary());
        assert_eq!(once, twice, "{bin}: second apply changed the table");
        assert_eq!(
            twice
                .lines()
                .filter(|l| *l == "-A PREROUTING -p tcp -j TRELLIS_INBOUND")
                .count(),
            1,
            "{bin}: {twice}"
        );
        assert_eq!(
            twice
                .lines()
                .filter(|l| *l == "-A OUTPUT -p tcp -j TRELLIS_OUTPUT")
                .count(),
            1,
            "{bin}: {twice}"
        );
        for chain in OWN_CHAINS {
            assert!(
                twice.contains(&format!(":{chain}")),
                "{bin}: {chain} missing"
            );
        }
        for needle in [
            "--uid-owner 1337",
            "--gid-owner 1337",
            "--dport 5432 -j RETURN",
            "--dport 22 -j RETURN",
            "-d 169.254.0.0/16 -j RETURN",
            "--to-ports 15001",
            "--to-ports 15006",
        ] {
            assert!(
                twice.contains(needle),
                "{bin}: `{needle}` missing in\n{twice}"
            );
        }
        // The same rules in ip6tables, with ::1 for loopback.
        let v6 = ipt.ip6_counterpart();
        let six = normalized_nat(&ns.name, &v6.save_binary());
        for needle in [
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
            "-A TRELLIS_OUTPUT -d ::1/128 -j RETURN",
            "--uid-owner 1337",
            "--dport 22 -j RETURN",
            "--to-ports 15001",
            "--to-ports 15006",
        ] {
            assert!(six.contains(needle), "{bin}: `{needle}` missing in\n{six}");
        }
        assert!(
            !six.contains("169.254"),
            "{bin}: IPv4 CIDR in ip6tables:\n{six}"
        );
        // The library's own save helper sees the same table.
        let saved = save_nat_in(&ipt, &runner).expect("save");
        assert!(saved.contains("TRELLIS_INBOUND"));

        // Re-applying another config replaces the rules in one transaction: the
        // result is what a fresh apply of it writes, with no trace of the old one.
        let other = InitConfig {
            exclude_outbound_ports: vec![6379],
            ..config(backend)
        };
        apply_in(&other, &runner).expect("re-apply");
        let replaced = normalized_nat(&ns.name, &ipt.save_binary());
        assert!(!replaced.contains("--dport 5432"), "{bin}: {replaced}");
        let fresh_ns = Netns::create();
        let fresh_runner = SystemRunner::in_netns(&fresh_ns.name);
        apply_in(&other, &fresh_runner).expect("fresh apply");
        let fresh = normalized_nat(&fresh_ns.name, &ipt.save_binary());
        assert_eq!(
            replaced, fresh,
            "{bin}: re-apply differs from a fresh apply"
        );

        cleanup_in(backend, &runner).expect("cleanup");
        let after = normalized_nat(&ns.name, &ipt.save_binary());
        assert!(!after.contains("TRELLIS"), "{bin}: left over:\n{after}");
        let after6 = normalized_nat(&ns.name, &v6.save_binary());
        assert!(!after6.contains("TRELLIS"), "{bin}: left over:\n{after6}");
        cleanup_in(backend, &runner).expect("cleanup of nothing is fine");
        eprintln!("{bin}: apply x2 + cleanup ok");
    }
}

fn auto_backend_works_in_a_namespace() {
    let ns = Netns::create();
    let runner = SystemRunner::in_netns(&ns.name);
    let ipt = apply_in(&InitConfig::default(), &runner).expect("apply");
    let text = normalized_nat(&ns.name, &ipt.save_binary());
    assert!(
        text.contains("-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{text}"
    );
    cleanup_in(Backend::Auto, &runner).expect("cleanup");
}
