//! Tests of the test bed itself. Each needs root and `ip netns`; elsewhere every test is
//! reported as ignored in the runner's summary (`harness = false`: [`run_root_tests`]
//! decides that at run time).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_init::InitConfig;
use trellis_tests::{TestBed, netns, run_root_tests};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(10);

fn main() {
    run_root_tests(&[
        (
            "pods_reach_each_other_over_the_bridge",
            pods_reach_each_other_over_the_bridge,
        ),
        (
            "service_name_resolves_and_dnat_reaches_the_backend",
            service_name_resolves_and_dnat_reaches_the_backend,
        ),
        (
            "dnat_spreads_over_several_backends",
            dnat_spreads_over_several_backends,
        ),
        (
            "root_namespace_has_no_way_into_the_bed",
            root_namespace_has_no_way_into_the_bed,
        ),
        (
            "drop_removes_namespaces_files_and_processes",
            drop_removes_namespaces_files_and_processes,
        ),
        (
            "trellis_init_rules_redirect_in_a_pod",
            trellis_init_rules_redirect_in_a_pod,
        ),
        (
            "a_panicking_test_still_cleans_up",
            a_panicking_test_still_cleans_up,
        ),
        (
            "namespaces_of_dead_processes_are_swept",
            namespaces_of_dead_processes_are_swept,
        ),
    ]);
}

fn pods_reach_each_other_over_the_bridge() -> Result<()> {
    let mut bed = TestBed::new("bridge")?;
    let a = bed.add_pod("a")?;
    let b = bed.add_pod("b")?;
    assert_eq!(a.ip, Ipv4Addr::new(10, 244, 0, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 244, 0, 3));
    let echo = bed.spawn(&b, None, APP, &["tcp-echo", "--listen", "0.0.0.0:7000"])?;
    echo.wait_listening(READY)?;
    let out = bed.exec_ok(&a, APP, &["tcp-send", &format!("{}:7000", b.ip), "hello"])?;
    assert_eq!(out.trim(), "hello");
    // By pod name through the hosts file, and as a non-root UID.
    let out = bed.exec_as(
        &a,
        Some(1337),
        APP,
        &["tcp-send", "b:7000", "by-name"],
        READY,
    )?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "by-name");
    // The node namespace is reachable at the bridge address.
    let node = bed.node().clone();
    let srv = bed.spawn(
        &node,
        None,
        APP,
        &["tcp-echo", "--listen", "10.244.0.1:7001", "--name", "node"],
    )?;
    srv.wait_listening(READY)?;
    let addr = format!("{}:7001", bed.node_reachable_addr());
    assert_eq!(
        bed.exec_ok(&b, APP, &["tcp-send", &addr, "x"])?.trim(),
        "node: x"
    );
    Ok(())
}

fn service_name_resolves_and_dnat_reaches_the_backend() -> Result<()> {
    let mut bed = TestBed::new("svc")?;
    let a = bed.add_pod("a")?;
    let b = bed.add_pod("b")?;
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let svc = bed.add_service("web", "default", vip)?;
    assert!(
        bed.add_service("bad", "default", Ipv4Addr::new(10, 244, 0, 9))
            .is_err()
    );
    // A pod added after the service knows it too.
    let c = bed.add_pod("c")?;
    let http = bed.spawn(
        &b,
        None,
        APP,
        &["http-echo", "--listen", "0.0.0.0:8080", "--name", "pod-b"],
    )?;
    http.wait_listening(READY)?;
    for pod in [&a, &c] {
        let hosts = bed.exec_ok(pod, "getent", &["hosts", &svc.fqdn()])?;
        assert!(hosts.starts_with("10.96.0.10"), "{hosts}");
        bed.add_kube_proxy_dnat(pod, vip, 80, &[(b.ip, 8080)])?;
    }
    let out = bed.exec_ok(
        &a,
        APP,
        &[
            "http-get",
            "http://web.default.svc.cluster.local/hello",
            "--count",
            "3",
        ],
    )?;
    assert_eq!(out.matches("HTTP 200").count(), 3, "{out}");
    assert!(out.contains("pod-b GET /hello"), "{out}");
    let out = bed.exec_ok(&c, APP, &["http-get", "http://web/short"])?;
    assert!(out.contains("pod-b GET /short"), "{out}");
    Ok(())
}

fn dnat_spreads_over_several_backends() -> Result<()> {
    let mut bed = TestBed::new("lb")?;
    let client = bed.add_pod("client")?;
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    bed.add_service("echo", "default", vip)?;
    let mut backends = Vec::new();
    for name in ["b1", "b2"] {
        let pod = bed.add_pod(name)?;
        let srv = bed.spawn(
            &pod,
            None,
            APP,
            &["tcp-echo", "--listen", "0.0.0.0:7000", "--name", name],
        )?;
        srv.wait_listening(READY)?;
        backends.push((pod.ip, 7000));
    }
    bed.add_kube_proxy_dnat(&client, vip, 7000, &backends)?;
    let mut seen = std::collections::BTreeSet::new();
    // Bounded: 40 connections; the chance of never seeing one backend is 2^-39.
    for i in 0..40 {
        let out = bed.exec_ok(&client, APP, &["tcp-send", "echo:7000", &format!("n{i}")])?;
        seen.insert(out.split(':').next().unwrap_or_default().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    Ok(())
}

fn root_namespace_has_no_way_into_the_bed() -> Result<()> {
    let mut bed = TestBed::new("isolation")?;
    bed.add_pod("a")?;
    // Only look at routing and addresses; no packet is sent from the root namespace.
    let addrs = netns::ip(&["-o", "-4", "addr", "show"])?;
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        !addrs.contains("10.244."),
        "root namespace has a pod address:\n{addrs}"
    );
    let route = std::process::Command::new("ip")
        .args(["route", "get", "10.244.0.2"])
        .output()
        .context("ip route get")?;
    let route = String::from_utf8_lossy(&route.stdout).to_string()
        + &String::from_utf8_lossy(&route.stderr);
    assert!(!route.contains("br0") && !route.contains("vp0"), "{route}");
    let links = netns::ip(&["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links
            .lines()
            .any(|l| l.contains(": vp0") || l.contains("@vp0")),
        "{links}"
    );
    Ok(())
}

fn drop_removes_namespaces_files_and_processes() -> Result<()> {
    let (names, pid) = {
        let mut bed = TestBed::new("drop")?;
        let a = bed.add_pod("a")?;
        let srv = bed.spawn(
            &a,
            Some(1337),
            APP,
            &["tcp-echo", "--listen", "0.0.0.0:7000"],
        )?;
        srv.wait_listening(READY)?;
        let names: Vec<String> = vec![bed.node().netns.clone(), a.netns.clone()];
        let listed = netns::list()?;
        for n in &names {
            assert!(listed.contains(n), "{n} missing from {listed:?}");
            assert!(netns::etc_dir(n).join("hosts").is_file());
        }
        (names, srv.pid)
    };
    let listed = netns::list()?;
    for n in &names {
        assert!(!listed.contains(n), "{n} still listed");
        assert!(!netns::etc_dir(n).exists(), "/etc/netns/{n} still there");
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} alive"
    );
    Ok(())
}

/// The Trellis init rules, for real: in a meshed pod, outgoing TCP goes to whatever
/// listens on 15001 unless it comes from UID 1337; incoming goes to 15006.
fn trellis_init_rules_redirect_in_a_pod() -> Result<()> {
    let mut bed = TestBed::new("redirect")?;
    let a = bed.add_pod("a")?;
    let b = bed.add_pod("b")?;
    bed.apply_init(&a, &InitConfig::default())?;
    bed.apply_init(&b, &InitConfig::default())?;
    bed.apply_init(&a, &InitConfig::default())
        .context("second apply")?;
    let servers = [
        (&a, "0.0.0.0:15001", "a-outbound"),
        (&b, "0.0.0.0:15006", "b-inbound"),
        (&b, "0.0.0.0:7000", "b-app"),
    ];
    for (pod, listen, name) in servers {
        let pod = pod.clone();
        let s = bed.spawn(
            &pod,
            Some(1337),
            APP,
            &["tcp-echo", "--listen", listen, "--name", name],
        )?;
        s.wait_listening(READY)?;
    }
    let to_b = format!("{}:7000", b.ip);
    // The app (root) in A is redirected to A's outbound port.
    let out = bed.exec_ok(&a, APP, &["tcp-send", &to_b, "app"])?;
    assert_eq!(out.trim(), "a-outbound: app");
    // The proxy's UID goes out directly, and lands on B's inbound port.
    let out = bed.exec_as(&a, Some(1337), APP, &["tcp-send", &to_b, "proxy"], READY)?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "b-inbound: proxy",
        "{out:?}"
    );
    // Inside B, loopback is never redirected.
    let out = bed.exec_ok(&b, APP, &["tcp-send", "127.0.0.1:7000", "local"])?;
    assert_eq!(out.trim(), "b-app: local");
    Ok(())
}

fn a_panicking_test_still_cleans_up() -> Result<()> {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut bed = TestBed::new("panic").expect("bed");
        let a = bed.add_pod("a").expect("pod");
        let mut n = names.lock().expect("lock");
        n.push(bed.node().netns.clone());
        n.push(a.netns.clone());
        drop(n);
        panic!("deliberate panic to test cleanup");
    }));
    assert!(result.is_err());
    let listed = netns::list()?;
    for n in names
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        assert!(!listed.contains(n), "{n} left after panic");
        assert!(!netns::etc_dir(n).exists());
    }
    Ok(())
}

fn namespaces_of_dead_processes_are_swept() -> Result<()> {
    // A pid that is not running now.
    let dead = (4_000_000u32..4_000_100)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .context("no free pid found")?;
    let stale = format!("trellis-stale-{dead}-0-node");
    // Sweeps by beds of tests running in parallel may remove it while it is being made
    // (it belongs to a dead pid after all): retry, a bounded number of times.
    let mut made = Err(anyhow::anyhow!("not tried"));
    for _ in 0..10 {
        made = netns::add(&stale);
        if made.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    made?;
    netns::write_hosts(&stale, "127.0.0.1 localhost\n")?;
    let bed = TestBed::new("sweeper");
    let listed = netns::list()?;
    if listed.contains(&stale) {
        netns::delete(&stale);
        panic!("stale namespace {stale} was not swept");
    }
    assert!(!netns::etc_dir(&stale).exists());
    drop(bed?);
    Ok(())
}
