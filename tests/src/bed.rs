//! The test bed: a node namespace with a bridge, pods as namespaces on it, services as
//! `/etc/hosts` names, kube-proxy-like DNAT, and processes inside pods.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use trellis_init::{InitConfig, Ipv4Cidr, SystemRunner};

use crate::netns::{self, ip};
use crate::process::{ChildHandle, netns_command, read_log, run_with_timeout};

/// The bridge's address in the node namespace; pods use it as their default gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The pod network.
pub const POD_PREFIX_LEN: u8 = 16;
/// The bridge's IPv6 address in the node namespace, for dual-stack pods
/// ([`TestBed::add_dual_stack_pod`]): a unique-local network, fd00:10:244::/64.
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The IPv6 pod network's prefix length.
pub const POD_IPV6_PREFIX_LEN: u8 = 64;
/// Where service VIPs come from (10.96.0.0/12, as in Kubernetes).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// Time limit of [`TestBed::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

static BEDS: AtomicU32 = AtomicU32::new(0);

/// A pod: a network namespace with one interface on the node's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The name given to [`TestBed::add_pod`] (`node` for the node namespace).
    pub name: String,
    /// The network namespace, for `ip netns exec`.
    pub netns: String,
    /// Its address on the pod network.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, for a dual-stack pod ([`TestBed::add_dual_stack_pod`]).
    pub ipv6: Option<Ipv6Addr>,
}

/// A service known by name in every pod's `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Service name, e.g. `web`.
    pub name: String,
    /// Kubernetes namespace, e.g. `default`.
    pub namespace: String,
    /// The virtual IP, inside 10.96.0.0/12.
    pub vip: Ipv4Addr,
}

impl Service {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The names the hosts files give it: `name name.ns name.ns.svc name.ns.svc.cluster.local`.
    pub fn host_names(&self) -> Vec<String> {
        let (n, ns) = (&self.name, &self.namespace);
        vec![
            n.clone(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            self.fqdn(),
        ]
    }
}

/// Owns the namespaces, hosts files and processes of one test; [`Drop`] removes them
/// all, also when the test panics (and then prints every process log to stderr).
///
/// The node namespace `<id>-node` holds bridge `br0` with 10.244.0.1/16 and has
/// IPv4 forwarding on; the root namespace gets no address or route into the bed. A
/// control plane can run in the node namespace ([`TestBed::node`], reachable from pods
/// at [`TestBed::node_reachable_addr`]) or in a pod of its own (`add_pod("control")`).
pub struct TestBed {
    id: String,
    node: Pod,
    pods: Vec<Pod>,
    services: Vec<Service>,
    children: Vec<ChildHandle>,
    namespaces: Vec<String>,
    dir: Option<tempfile::TempDir>,
    next_host: u32,
}

impl TestBed {
    /// Builds an empty bed named `trellis-<prefix>-<pid>-<n>` (prefix reduced to
    /// `[a-z0-9]`): node namespace, bridge, forwarding. Namespaces left by dead test
    /// processes are swept first.
    pub fn new(prefix: &str) -> Result<Self> {
        netns::sweep_stale();
        let n = BEDS.fetch_add(1, Ordering::SeqCst);
        let id = format!(
            "{}-{}-{}-{n}",
            netns::NAME_PREFIX,
            netns::sanitize(prefix),
            std::process::id()
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .context("create test bed temp dir")?;
        let node = Pod {
            name: "node".into(),
            netns: format!("{id}-node"),
            ip: NODE_IP,
            ipv6: None,
        };
        // Built before anything exists, so Drop cleans up a half-built bed.
        let mut bed = Self {
            id,
            node: node.clone(),
            pods: Vec::new(),
            services: Vec::new(),
            children: Vec::new(),
            namespaces: Vec::new(),
            dir: Some(dir),
            next_host: 2,
        };
        let ns = node.netns.as_str();
        netns::add(ns)?;
        bed.namespaces.push(node.netns.clone());
        let cidr = format!("{NODE_IP}/{POD_PREFIX_LEN}");
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ns, "addr", "add", &cidr, "dev", "br0"])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
        netns::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        bed.write_hosts()?;
        tracing::info!(bed = %bed.id, "test bed ready");
        Ok(bed)
    }

    /// The bed's unique id (prefix of every namespace name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node namespace as a [`Pod`] named `node` at 10.244.0.1, for `spawn`/`exec`.
    pub fn node(&self) -> &Pod {
        &self.node
    }

    /// The address pods reach the node namespace at (the bridge, 10.244.0.1).
    pub fn node_reachable_addr(&self) -> Ipv4Addr {
        NODE_IP
    }

    /// The pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The services added so far.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The folder holding process logs (kept after a panic).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/tmp"), |d| d.path())
    }

    /// Adds a pod: namespace `<id>-<name>`, `eth0` (a veth whose other end `vp<N>` is on
    /// `br0` in the node namespace) with the next free 10.244.x.y/16, `lo` up, default
    /// route via 10.244.0.1; rewrites every hosts file.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        if name.is_empty()
            || name == "node"
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("bad pod name `{name}`: use [a-z0-9-], not `node`");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod `{name}` already exists in {}", self.id);
        }
        let host = self.next_host;
        if host >= (1 << (32 - u32::from(POD_PREFIX_LEN))) - 1 {
            bail!("pod network is full");
        }
        self.next_host += 1;
        let pod = Pod {
            name: name.to_string(),
            netns: format!("{}-{name}", self.id),
            ip: Ipv4Addr::from(u32::from(NODE_IP) - 1 + host),
            ipv6: None,
        };
        let (node, ns) = (self.node.netns.as_str(), pod.netns.as_str());
        netns::add(ns)?;
        self.namespaces.push(pod.netns.clone());
        // Both ends are created from inside the node namespace: nothing touches the root one.
        let veth = format!("vp{}", self.pods.len());
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0"])?;
        ip(&["-n", node, "link", "set", &veth, "up"])?;
        let addr = format!("{}/{POD_PREFIX_LEN}", pod.ip);
        let gw = NODE_IP.to_string();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
        self.pods.push(pod.clone());
        self.write_hosts()?;
        tracing::info!(bed = %self.id, pod = %pod.name, ip = %pod.ip, "pod added");
        Ok(pod)
    }

    /// Like [`TestBed::add_pod`], plus an IPv6 address on the same `eth0`: the pod's
    /// host number in fd00:10:244::/64 (10.244.0.5 gets fd00:10:244::5), default IPv6
    /// route via the node's fd00:10:244::1. The first call gives the node's bridge that
    /// address and turns IPv6 forwarding on in the node namespace; the root namespace
    /// still gets nothing.
    pub fn add_dual_stack_pod(&mut self, name: &str) -> Result<Pod> {
        let node = self.node.netns.clone();
        if self.node.ipv6.is_none() {
            let cidr = format!("{NODE_IPV6}/{POD_IPV6_PREFIX_LEN}");
            // nodad: usable at once, not after duplicate address detection.
            ip(&["-n", &node, "addr", "add", &cidr, "dev", "br0", "nodad"])?;
            netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
            self.node.ipv6 = Some(NODE_IPV6);
        }
        let mut pod = self.add_pod(name)?;
        let host = u32::from(pod.ip) - u32::from(NODE_IP) + 1;
        let v6 = Ipv6Addr::from(u128::from(NODE_IPV6) - 1 + u128::from(host));
        let ns = pod.netns.as_str();
        let addr = format!("{v6}/{POD_IPV6_PREFIX_LEN}");
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0", "nodad"])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &NODE_IPV6.to_string(),
        ])?;
        pod.ipv6 = Some(v6);
        if let Some(stored) = self.pods.iter_mut().find(|p| p.name == pod.name) {
            stored.ipv6 = Some(v6);
        }
        tracing::info!(bed = %self.id, pod = %pod.name, ipv6 = %v6, "pod is dual-stack");
        Ok(pod)
    }

    /// Records a service: every hosts file (pods and node) maps its names to `vip`.
    /// Nothing routes the VIP: use [`TestBed::add_kube_proxy_dnat`] or the mesh.
    pub fn add_service(&mut self, name: &str, namespace: &str, vip: Ipv4Addr) -> Result<Service> {
        let range = Ipv4Cidr::new(SERVICE_CIDR.0, SERVICE_CIDR.1)?;
        if !range.contains(vip) {
            bail!("service VIP {vip} is outside {range}");
        }
        if self
            .services
            .iter()
            .any(|s| s.name == name && s.namespace == namespace)
        {
            bail!("service {name}.{namespace} already exists");
        }
        let svc = Service {
            name: name.to_string(),
            namespace: namespace.to_string(),
            vip,
        };
        self.services.push(svc.clone());
        self.write_hosts()?;
        Ok(svc)
    }

    /// The hosts file every namespace of the bed gets.
    pub fn hosts_file(&self) -> String {
        let mut s = format!(
            "# trellis test bed {}\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            self.id
        );
        s += &format!("{}\tnode\n", self.node.ip);
        for p in &self.pods {
            s += &format!("{}\t{}\n", p.ip, p.name);
        }
        for svc in &self.services {
            s += &format!("{}\t{}\n", svc.vip, svc.host_names().join(" "));
        }
        s
    }

    fn write_hosts(&self) -> Result<()> {
        let content = self.hosts_file();
        for ns in &self.namespaces {
            netns::write_hosts(ns, &content)?;
        }
        Ok(())
    }

    /// As kube-proxy would: nat OUTPUT rules in `pod` that DNAT `vip:port` to one of
    /// `backends` (several are chosen at random with `-m statistic`). Meant for pods
    /// without a sidecar; in a meshed pod the Trellis hook comes first.
    pub fn add_kube_proxy_dnat(
        &self,
        pod: &Pod,
        vip: Ipv4Addr,
        port: u16,
        backends: &[(Ipv4Addr, u16)],
    ) -> Result<()> {
        if backends.is_empty() {
            bail!("no backends for {vip}:{port}");
        }
        let n = backends.len();
        for (i, (addr, bport)) in backends.iter().enumerate() {
            let dst = format!("{vip}/32");
            let dport = port.to_string();
            let to = format!("{addr}:{bport}");
            let prob = format!("{:.5}", 1.0 / (n - i) as f64);
            let mut args = vec![
                "-w", "-t", "nat", "-A", "OUTPUT", "-d", &dst, "-p", "tcp", "--dport", &dport,
            ];
            if i + 1 < n {
                args.extend([
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &prob,
                ]);
            }
            args.extend(["-j", "DNAT", "--to-destination", &to]);
            self.exec_ok(pod, "iptables", &args)?;
        }
        Ok(())
    }

    /// Writes the Trellis redirection rules into `pod`, as its init container would.
    pub fn apply_init(&self, pod: &Pod, cfg: &InitConfig) -> Result<()> {
        trellis_init::apply_in(cfg, &SystemRunner::in_netns(&pod.netns))
            .with_context(|| format!("trellis-init in pod {}", pod.name))?;
        Ok(())
    }

    /// Starts `program args` in `pod` (as `uid`, if given, with the same GID), output to
    /// a log file in [`TestBed::dir`]. Killed when the bed drops.
    pub fn spawn(
        &mut self,
        pod: &Pod,
        uid: Option<u32>,
        program: &str,
        args: &[&str],
    ) -> Result<ChildHandle> {
        self.spawn_env(pod, uid, program, args, &[])
    }

    /// [`TestBed::spawn`] with extra environment variables.
    pub fn spawn_env(
        &mut self,
        pod: &Pod,
        uid: Option<u32>,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ChildHandle> {
        let base = Path::new(program)
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("proc");
        let mut cmd = netns_command(&pod.netns, uid, program, args);
        cmd.envs(env.iter().copied());
        let desc = format!("{}: {program} {}", pod.name, args.join(" "));
        self.spawn_command(&format!("{}-{base}", pod.name), desc, cmd)
    }

    /// Starts a command built by the caller (e.g. `nsenter --net=...`, which keeps the
    /// caller's mount namespace where `ip netns exec` would make a private one), output
    /// to a log file `<n>-<label>.log` in [`TestBed::dir`]. Killed when the bed drops.
    pub fn spawn_command(
        &mut self,
        label: &str,
        description: String,
        mut cmd: std::process::Command,
    ) -> Result<ChildHandle> {
        let log_path = self
            .dir()
            .join(format!("{:02}-{label}.log", self.children.len()));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {description}"))?;
        tracing::debug!(pid = child.id(), desc = %description, "spawned");
        let handle = ChildHandle::new(child, log_path, description);
        self.children.push(handle.clone());
        Ok(handle)
    }

    /// Runs `program args` in `pod` as root and waits (at most [`EXEC_TIMEOUT`]).
    /// A non-zero exit is not an error here; see [`TestBed::exec_ok`].
    pub fn exec(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<Output> {
        self.exec_as(pod, None, program, args, EXEC_TIMEOUT)
    }

    /// [`TestBed::exec`] with a UID and a time limit.
    pub fn exec_as(
        &self,
        pod: &Pod,
        uid: Option<u32>,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        run_with_timeout(netns_command(&pod.netns, uid, program, args), timeout)
    }

    /// Runs as root in `pod`; a non-zero exit is an error with stderr. Returns stdout.
    pub fn exec_ok(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<String> {
        let out = self.exec(pod, program, args)?;
        if !out.status.success() {
            return Err(anyhow!(
                "`{program} {}` in pod {} failed ({}): {}{}",
                args.join(" "),
                pod.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An admin page of the Trellis proxy in `pod` (admin listens on the pod's loopback
    /// only, so the test app fetches it from inside): the status line, then the body.
    pub fn proxy_admin(&self, pod: &Pod, path: &str) -> Result<String> {
        let app = crate::testapp_path()?;
        let app = app.to_string_lossy();
        let url = format!("http://127.0.0.1:15000{path}");
        let out = self.exec(pod, &app, &["http-get", &url])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `check` every 100 ms until it says true (an error counts as not yet);
    /// after `within`, fails with `what` and every process log.
    pub fn eventually(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            if check().unwrap_or(false) {
                return Ok(());
            }
            if start.elapsed() > within {
                bail!("{what}: not true within {within:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every spawned process's log, with a header each.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for c in &self.children {
            s += &format!("===== {} (pid {}) =====\n", c.description, c.pid);
            s += &read_log(&c.log_path);
            if !s.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- test bed {} logs -----\n{}", self.id, self.logs());
            if let Some(dir) = self.dir.take() {
                eprintln!("test bed {} logs kept in {}", self.id, dir.keep().display());
            }
        }
        for c in &self.children {
            if let Err(e) = c.kill() {
                tracing::warn!(pid = c.pid, error = %e, "could not kill child");
            }
        }
        for ns in self.namespaces.iter().rev() {
            netns::delete(ns);
        }
        tracing::info!(bed = %self.id, "test bed removed");
    }
}
