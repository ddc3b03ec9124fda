//! Traffic redirection: the `mesh-init` container's command line.
//!
//! The spec and the iptables rules generator are the contract with the proxy
//! (`mesh_wire::redirect`): `mesh-proxy redirect` parses these flags back and applies the
//! rules; the injector builds a [`RedirectSpec`] from config + pod annotations
//! (`template::redirect_spec`) and writes [`RedirectSpec::args`] into the pod.

pub use mesh_wire::redirect::{Cidr, IpRanges, PortSet, RedirectSpec};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::config::InjectionConfig;
    use crate::inject::template::redirect_spec;
    use std::collections::BTreeMap;

    fn spec(ann: &[(&str, &str)]) -> RedirectSpec {
        let a: BTreeMap<String, String> = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        redirect_spec(&InjectionConfig::default(), &a).unwrap()
    }

    use mesh_wire::redirect::testing::{DEFAULT_INBOUND, HEAD, OWNER};

    #[test]
    fn default_rules() {
        let s = spec(&[]);
        let expected =
            format!("{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n");
        assert_eq!(s.iptables_rules(), expected);
        assert_eq!(
            s.args().join(" "),
            "redirect --proxy-uid 1337 --proxy-gid 1337 --inbound-port 15006 --outbound-port 15001 \
             --include-inbound-ports * --exclude-inbound-ports 15000,15020,15021,15090 \
             --include-outbound-ip-ranges *"
        );
    }

    #[test]
    fn include_inbound_ports_annotation() {
        let s = spec(&[(
            "traffic.sidecar.meshctl.io/includeInboundPorts",
            "8080, 5678,15021",
        )]);
        let expected = format!(
            "{HEAD}-A PREROUTING -p tcp -j MESH_INBOUND
-A MESH_INBOUND -p tcp --dport 5678 -j MESH_IN_REDIRECT
-A MESH_INBOUND -p tcp --dport 8080 -j MESH_IN_REDIRECT
{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n"
        );
        assert_eq!(s.iptables_rules(), expected);
    }

    #[test]
    fn empty_include_inbound_disables_inbound_capture() {
        let s = spec(&[("traffic.sidecar.istio.io/includeInboundPorts", "")]);
        let expected = format!("{HEAD}{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n");
        assert_eq!(s.iptables_rules(), expected);
        assert!(!s.args().contains(&"--include-inbound-ports".to_string()));
    }

    #[test]
    fn exclude_inbound_ports_annotation() {
        let s = spec(&[("traffic.sidecar.meshctl.io/excludeInboundPorts", "9090")]);
        assert!(
            s.iptables_rules()
                .contains("-A MESH_INBOUND -p tcp --dport 9090 -j RETURN\n")
        );
        assert!(
            s.args()
                .join(" ")
                .contains("--exclude-inbound-ports 9090,15000,15020,15021,15090")
        );
    }

    #[test]
    fn exclude_outbound_ports_and_ranges() {
        let s = spec(&[
            (
                "traffic.sidecar.meshctl.io/excludeOutboundPorts",
                "5432,6379",
            ),
            (
                "traffic.sidecar.meshctl.io/excludeOutboundIPRanges",
                "10.0.0.0/8,169.254.169.254",
            ),
        ]);
        let expected = format!(
            "{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN
-A MESH_OUTPUT -p tcp --dport 6379 -j RETURN
-A MESH_OUTPUT -d 10.0.0.0/8 -j RETURN
-A MESH_OUTPUT -d 169.254.169.254/32 -j RETURN
-A MESH_OUTPUT -j MESH_REDIRECT
COMMIT
"
        );
        assert_eq!(s.iptables_rules(), expected);
        assert!(s.args().join(" ").ends_with(
            "--exclude-outbound-ports 5432,6379 --include-outbound-ip-ranges * \
             --exclude-outbound-ip-ranges 10.0.0.0/8,169.254.169.254/32"
        ));
    }

    #[test]
    fn include_outbound_ranges_and_ports() {
        let s = spec(&[
            (
                "traffic.sidecar.meshctl.io/includeOutboundIPRanges",
                "10.96.0.0/12",
            ),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "443"),
        ]);
        let expected = format!(
            "{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -p tcp --dport 443 -j MESH_REDIRECT
-A MESH_OUTPUT -d 10.96.0.0/12 -j MESH_REDIRECT
COMMIT
"
        );
        assert_eq!(s.iptables_rules(), expected);
    }

    #[test]
    fn meshctl_annotation_wins_over_istio() {
        let s = spec(&[
            ("traffic.sidecar.meshctl.io/excludeOutboundPorts", "1"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "2"),
        ]);
        assert_eq!(s.exclude_outbound_ports.to_flag(), "1");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(PortSet::parse("80,x").is_err());
        assert!(PortSet::parse("0").is_err());
        assert!(PortSet::parse("70000").is_err());
        assert!(IpRanges::parse("10.0.0.0/33").is_err());
        assert!(IpRanges::parse("fe80::/10").is_err());
        let a: BTreeMap<String, String> = [(
            "traffic.sidecar.meshctl.io/excludeOutboundIPRanges".to_string(),
            "nope".to_string(),
        )]
        .into();
        let e = redirect_spec(&InjectionConfig::default(), &a)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("traffic.sidecar.meshctl.io/excludeOutboundIPRanges"),
            "{e}"
        );
    }
}
