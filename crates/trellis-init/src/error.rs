//! Errors of planning and writing the rules.

use std::process::ExitStatus;

/// Everything that can go wrong while parsing the configuration or writing the rules.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An iptables command ran and failed.
    #[error("`{command}` failed ({status}) for rule `{rule}`: {stderr}")]
    Command {
        /// The full command line, including any `ip netns exec` prefix.
        command: String,
        /// The rule (or chain operation) the command was writing.
        rule: String,
        /// What the command printed on stderr, trimmed.
        stderr: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// A command could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The full command line.
        command: String,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// No working iptables binary was found for the requested backend.
    #[error("no working iptables binary (tried {tried}): {detail}")]
    NoIptables {
        /// The binaries that were tried, comma-separated.
        tried: String,
        /// What the last attempt said.
        detail: String,
    },
    /// The Pod can be reached over IPv6 but no ip6tables works: writing only the IPv4
    /// rules would leave IPv6 traffic to and from the app unredirected.
    #[error(
        "the pod has IPv6 address(es) {addresses} but `{binary}` does not work ({detail}): \
         refusing to leave IPv6 traffic unredirected; install ip6tables (with the nat table) \
         in the init image or disable IPv6 in the pod"
    )]
    NoIp6tables {
        /// The ip6tables binary matching the IPv4 backend.
        binary: String,
        /// The Pod's routable IPv6 addresses, comma-separated (or why they are unknown).
        addresses: String,
        /// What trying the binary said.
        detail: String,
    },
    /// A CIDR such as `10.0.0.0/8` could not be parsed.
    #[error("bad IPv4 CIDR `{text}`: {reason}")]
    BadCidr {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A port could not be parsed.
    #[error("bad port `{text}`: {reason}")]
    BadPort {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is inconsistent (for example a redirect port of 0).
    #[error("invalid init configuration: {0}")]
    Config(String),
}
