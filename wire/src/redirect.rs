//! The nat rules that capture a pod's traffic into its sidecar: [`RedirectSpec`] is what the
//! injector (`meshctl`'s `src/inject/`) builds from config and pod annotations and writes into
//! the `mesh-init` container as [`RedirectSpec::args`]; `mesh-proxy redirect` parses the same
//! flags back and applies [`RedirectSpec::iptables_rules`], so the flags in the pod and the
//! rules applied cannot drift. Pure: the rules are text, tested as text; applying them
//! (`iptables-restore`) is the proxy's.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Our chains in the nat table.
pub const CHAINS: [&str; 4] = [
    "MESH_INBOUND",
    "MESH_IN_REDIRECT",
    "MESH_OUTPUT",
    "MESH_REDIRECT",
];

/// A set of TCP ports: `*` (all), or a comma-separated list. Empty means none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSet {
    All,
    List(BTreeSet<u16>),
}

/// `-A MESH_OUTPUT [MATCH] -j TARGET`.
fn output_rule(w: &mut String, matcher: &str, target: &str) {
    let sep = if matcher.is_empty() { "" } else { " " };
    let _ = writeln!(w, "-A MESH_OUTPUT{sep}{matcher} -j {target}");
}

impl PortSet {
    /// iptables match fragments: every TCP port, or one per listed port.
    fn tcp_matches(&self) -> Vec<String> {
        match self {
            PortSet::All => vec!["-p tcp".to_string()],
            PortSet::List(ports) => ports
                .iter()
                .map(|p| format!("-p tcp --dport {p}"))
                .collect(),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::All);
        }
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port: u16 = part
                .parse()
                .map_err(|_| format!("{part:?} is not a port number (1-65535) or \"*\""))?;
            if port == 0 {
                return Err("port 0 is not a valid port".into());
            }
            set.insert(port);
        }
        Ok(Self::List(set))
    }

    pub fn none() -> Self {
        Self::List(BTreeSet::new())
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::List(l) if l.is_empty())
    }

    /// The canonical flag value: `*`, or ports sorted and comma-joined.
    pub fn to_flag(&self) -> String {
        match self {
            Self::All => "*".into(),
            Self::List(l) => join(l.iter()),
        }
    }
}

/// An IPv4 CIDR (`10.0.0.0/8`); a bare address means `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        let prefix = match p {
            None => 32,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
        };
        Ok(Self { addr, prefix })
    }
}

/// A set of IPv4 ranges: `*` (all) or a comma-separated list of CIDRs. Empty means none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpRanges {
    All,
    List(BTreeSet<Cidr>),
}

impl IpRanges {
    /// iptables match fragments: any destination (no match), or one per listed range.
    fn destination_matches(&self) -> Vec<String> {
        match self {
            IpRanges::All => vec![String::new()],
            IpRanges::List(ranges) => ranges.iter().map(|c| format!("-d {c}")).collect(),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::All);
        }
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            set.insert(Cidr::parse(part)?);
        }
        Ok(Self::List(set))
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::List(l) if l.is_empty())
    }

    pub fn to_flag(&self) -> String {
        match self {
            Self::All => "*".into(),
            Self::List(l) => join(l.iter()),
        }
    }
}

fn join<T: std::fmt::Display>(it: impl Iterator<Item = T>) -> String {
    it.map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// Everything `mesh-proxy redirect` needs. Built from config + pod annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    pub proxy_uid: i64,
    pub proxy_gid: i64,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub include_inbound_ports: PortSet,
    /// Always contains the proxy's own listening ports besides the app's.
    pub exclude_inbound_ports: PortSet,
    pub include_outbound_ports: PortSet,
    pub exclude_outbound_ports: PortSet,
    pub include_outbound_ip_ranges: IpRanges,
    pub exclude_outbound_ip_ranges: IpRanges,
}

impl RedirectSpec {
    /// Arguments after the image's `mesh-proxy` entrypoint. Empty lists are omitted.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "redirect".into(),
            "--proxy-uid".into(),
            self.proxy_uid.to_string(),
            "--proxy-gid".into(),
            self.proxy_gid.to_string(),
            "--inbound-port".into(),
            self.inbound_port.to_string(),
            "--outbound-port".into(),
            self.outbound_port.to_string(),
        ];
        let mut push = |flag: &str, empty: bool, v: String| {
            if !empty {
                a.push(flag.into());
                a.push(v);
            }
        };
        let p = |s: &PortSet| (s.is_empty(), s.to_flag());
        let r = |s: &IpRanges| (s.is_empty(), s.to_flag());
        let (e, v) = p(&self.include_inbound_ports);
        push("--include-inbound-ports", e, v);
        let (e, v) = p(&self.exclude_inbound_ports);
        push("--exclude-inbound-ports", e, v);
        let (e, v) = p(&self.include_outbound_ports);
        push("--include-outbound-ports", e, v);
        let (e, v) = p(&self.exclude_outbound_ports);
        push("--exclude-outbound-ports", e, v);
        let (e, v) = r(&self.include_outbound_ip_ranges);
        push("--include-outbound-ip-ranges", e, v);
        let (e, v) = r(&self.exclude_outbound_ip_ranges);
        push("--exclude-outbound-ip-ranges", e, v);
        a
    }

    /// The rules in `iptables-restore` format (nat table, IPv4).
    ///
    /// Inbound: PREROUTING → MESH_INBOUND; excluded ports RETURN; included ports (or all)
    /// jump to MESH_IN_REDIRECT (REDIRECT to the inbound port).
    /// Outbound: OUTPUT → MESH_OUTPUT; the proxy's own traffic (uid/gid) RETURNs, except
    /// loopback traffic to a non-127.0.0.1 address (the pod talking to itself through its
    /// own IP), which goes through inbound; 127.0.0.1 RETURNs; excluded ports and ranges
    /// RETURN; included ports, then included ranges (or everything) jump to MESH_REDIRECT
    /// (REDIRECT to the outbound port).
    pub fn iptables_rules(&self) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "* nat");
        for chain in CHAINS {
            let _ = writeln!(w, ":{chain} - [0:0]");
        }
        let _ = writeln!(
            w,
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        let _ = writeln!(
            w,
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        // Inbound.
        if !self.include_inbound_ports.is_empty() {
            let _ = writeln!(w, "-A PREROUTING -p tcp -j MESH_INBOUND");
            match &self.include_inbound_ports {
                PortSet::All => {
                    if let PortSet::List(ex) = &self.exclude_inbound_ports {
                        for p in ex {
                            let _ = writeln!(w, "-A MESH_INBOUND -p tcp --dport {p} -j RETURN");
                        }
                    }
                    let _ = writeln!(w, "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT");
                }
                PortSet::List(inc) => {
                    let ex = match &self.exclude_inbound_ports {
                        PortSet::List(ex) => ex.clone(),
                        PortSet::All => inc.clone(),
                    };
                    for p in inc.difference(&ex) {
                        let _ =
                            writeln!(w, "-A MESH_INBOUND -p tcp --dport {p} -j MESH_IN_REDIRECT");
                    }
                }
            }
        }
        // Outbound.
        let _ = writeln!(w, "-A OUTPUT -p tcp -j MESH_OUTPUT");
        // The proxy's own traffic (by uid, then gid): to another local address it is inbound
        // for this pod; to loopback or anywhere else it leaves uncaptured.
        for (owner, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            let _ = writeln!(
                w,
                "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --{owner}-owner {id} -j MESH_IN_REDIRECT"
            );
            let _ = writeln!(
                w,
                "-A MESH_OUTPUT -o lo -m owner ! --{owner}-owner {id} -j RETURN"
            );
            let _ = writeln!(w, "-A MESH_OUTPUT -m owner --{owner}-owner {id} -j RETURN");
        }
        let _ = writeln!(w, "-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN");
        for m in self.exclude_outbound_ports.tcp_matches() {
            output_rule(w, &m, "RETURN");
        }
        for m in self.exclude_outbound_ip_ranges.destination_matches() {
            output_rule(w, &m, "RETURN");
        }
        for m in self.include_outbound_ports.tcp_matches() {
            output_rule(w, &m, "MESH_REDIRECT");
        }
        for m in self.include_outbound_ip_ranges.destination_matches() {
            output_rule(w, &m, "MESH_REDIRECT");
        }
        let _ = writeln!(w, "COMMIT");
        o
    }
}

/// The nat rules `mesh-proxy redirect` writes for the injector's defaults (proxy uid/gid 1337,
/// inbound 15006, outbound 15001, admin/app-health/readiness/metrics ports excluded), in pieces, for the
/// rule-text tests of both `mesh-proxy redirect` and the injector (meshctl).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    /// The chains and the two REDIRECT targets.
    pub const HEAD: &str = "* nat
:MESH_INBOUND - [0:0]
:MESH_IN_REDIRECT - [0:0]
:MESH_OUTPUT - [0:0]
:MESH_REDIRECT - [0:0]
-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
";
    /// The proxy's own traffic and loopback.
    pub const OWNER: &str = "-A OUTPUT -p tcp -j MESH_OUTPUT
-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j MESH_IN_REDIRECT
-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j MESH_IN_REDIRECT
-A MESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A MESH_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN
";
    /// Inbound capture of every port but the proxy's own.
    pub const DEFAULT_INBOUND: &str = "-A PREROUTING -p tcp -j MESH_INBOUND
-A MESH_INBOUND -p tcp --dport 15000 -j RETURN
-A MESH_INBOUND -p tcp --dport 15020 -j RETURN
-A MESH_INBOUND -p tcp --dport 15021 -j RETURN
-A MESH_INBOUND -p tcp --dport 15090 -j RETURN
-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT
";
}

#[cfg(test)]
mod tests {
    use super::testing::{DEFAULT_INBOUND, HEAD, OWNER};
    use super::*;

    /// The injector's defaults (`docs/injection.md`).
    fn default_spec() -> RedirectSpec {
        RedirectSpec {
            proxy_uid: crate::names::PROXY_UID,
            proxy_gid: crate::names::PROXY_GID,
            inbound_port: crate::ports::SIDECAR_INBOUND,
            outbound_port: crate::ports::SIDECAR_OUTBOUND,
            include_inbound_ports: PortSet::All,
            exclude_inbound_ports: PortSet::parse("15090,15000,15020,15021").unwrap(),
            include_outbound_ports: PortSet::none(),
            exclude_outbound_ports: PortSet::none(),
            include_outbound_ip_ranges: IpRanges::All,
            exclude_outbound_ip_ranges: IpRanges::parse("").unwrap(),
        }
    }

    #[test]
    fn default_flags_and_rules() {
        let s = default_spec();
        assert_eq!(
            s.args().join(" "),
            "redirect --proxy-uid 1337 --proxy-gid 1337 --inbound-port 15006 --outbound-port 15001 \
             --include-inbound-ports * --exclude-inbound-ports 15000,15020,15021,15090 \
             --include-outbound-ip-ranges *"
        );
        assert_eq!(
            s.iptables_rules(),
            format!("{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n")
        );
    }

    #[test]
    fn flag_values_are_canonical() {
        assert_eq!(
            PortSet::parse(" 8080, 80,8080 ,").unwrap().to_flag(),
            "80,8080"
        );
        assert_eq!(PortSet::parse("*").unwrap().to_flag(), "*");
        assert!(PortSet::parse("").unwrap().is_empty());
        assert_eq!(
            IpRanges::parse("169.254.169.254,10.0.0.0/8")
                .unwrap()
                .to_flag(),
            "10.0.0.0/8,169.254.169.254/32"
        );
    }

    #[test]
    fn bad_values_name_what_is_wrong() {
        assert_eq!(
            PortSet::parse("80,x").unwrap_err(),
            "\"x\" is not a port number (1-65535) or \"*\""
        );
        assert_eq!(
            PortSet::parse("0").unwrap_err(),
            "port 0 is not a valid port"
        );
        assert!(PortSet::parse("70000").is_err());
        assert_eq!(
            IpRanges::parse("10.0.0.0/33").unwrap_err(),
            "\"10.0.0.0/33\" has an invalid prefix length"
        );
        assert_eq!(
            IpRanges::parse("fe80::/10").unwrap_err(),
            "\"fe80::/10\" is not an IPv4 address or CIDR"
        );
    }
}
