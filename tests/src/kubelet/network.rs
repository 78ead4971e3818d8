//! Pod networks: a namespace per pod, plugged into the node's bridge like the bed's own
//! pods (veth `vk<n>` on the bridge, `eth0` inside), with an address from the kubelet's
//! range (10.244.128.0/17 by default, disjoint from the bed's 10.244.0.2 upwards).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use trellis_init::Ipv4Cidr;

use super::config::KubeletConfig;
use super::services::KUBE_SERVICES_CHAIN;
use crate::netns::{self, ip};

/// Hands out pod addresses; released ones are used again.
#[derive(Debug)]
pub struct IpPool {
    cidr: Ipv4Cidr,
    next: u32,
    free: Vec<Ipv4Addr>,
}

impl IpPool {
    pub fn new(cidr: Ipv4Cidr) -> Self {
        Self {
            cidr,
            next: 1,
            free: Vec::new(),
        }
    }

    pub fn allocate(&mut self) -> Result<Ipv4Addr> {
        if let Some(ip) = self.free.pop() {
            return Ok(ip);
        }
        let size = 1u64 << (32 - u32::from(self.cidr.prefix()));
        if u64::from(self.next) + 1 >= size {
            bail!("pod range {} is full", self.cidr);
        }
        let ip = Ipv4Addr::from(u32::from(self.cidr.addr()) + self.next);
        self.next += 1;
        Ok(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if self.cidr.contains(ip) && !self.free.contains(&ip) {
            self.free.push(ip);
        }
    }
}

/// A pod's network namespace.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// `<bed-id>-k<n>`: the bed's sweep of dead tests' namespaces matches it.
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl PodNetwork {
    /// Makes the namespace, its hosts file, `eth0` and routes, and the jump into the
    /// kube-proxy chain (appended to nat OUTPUT, so the Trellis init's hook, which is
    /// inserted first, still sees a meshed pod's traffic before any DNAT).
    pub fn create(cfg: &KubeletConfig, index: u32, ip_addr: Ipv4Addr, hosts: &str) -> Result<Self> {
        let net = Self {
            netns: format!("{}-k{index}", cfg.bed_id),
            ip: ip_addr,
        };
        netns::add(&net.netns)?;
        if let Err(e) = net.plug(cfg, index, hosts) {
            net.remove();
            return Err(e);
        }
        Ok(net)
    }

    fn plug(&self, cfg: &KubeletConfig, index: u32, hosts: &str) -> Result<()> {
        let node = cfg.node_netns();
        let ns = self.netns.as_str();
        // Written before anything runs in it: `ip netns exec` binds it only if it exists.
        netns::write_hosts(ns, hosts)?;
        let veth = format!("vk{index}");
        ip(&[
            "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", &node, "link", "set", &veth, "master", &cfg.bridge])?;
        ip(&["-n", &node, "link", "set", &veth, "up"])?;
        let addr = format!("{}/{}", self.ip, cfg.pod_prefix_len);
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &cfg.node_ip.to_string(),
        ])?;
        for args in [
            vec!["-w", "-t", "nat", "-N", KUBE_SERVICES_CHAIN],
            vec!["-w", "-t", "nat", "-A", "OUTPUT", "-j", KUBE_SERVICES_CHAIN],
        ] {
            let mut full = vec!["netns", "exec", ns, "iptables"];
            full.extend(args);
            netns::run("ip", &full).context("kube-proxy chain")?;
        }
        Ok(())
    }

    /// Deletes the namespace (its veth pair goes with it) and its `/etc/netns` folder.
    pub fn remove(&self) {
        netns::delete(&self.netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_stays_in_range_and_reuses() -> Result<()> {
        let mut pool = IpPool::new("10.244.128.0/30".parse()?);
        let a = pool.allocate()?;
        let b = pool.allocate()?;
        assert_eq!(
            (a, b),
            (
                Ipv4Addr::new(10, 244, 128, 1),
                Ipv4Addr::new(10, 244, 128, 2)
            )
        );
        assert!(
            pool.allocate().is_err(),
            "the broadcast address is not handed out"
        );
        pool.release(a);
        assert_eq!(pool.allocate()?, a);
        Ok(())
    }
}
