use clap::Parser;

use mesh_wire::redirect::RedirectSpec;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: RedirectArgs,
}

/// Parses a command line as the injector writes it (after `mesh-proxy redirect`).
fn spec(line: &str) -> RedirectSpec {
    let argv = std::iter::once("redirect").chain(line.split_whitespace());
    Cli::try_parse_from(argv).unwrap().args.spec()
}

const DEFAULT_LINE: &str = "--proxy-uid 1337 --proxy-gid 1337 --inbound-port 15006 \
    --outbound-port 15001 --include-inbound-ports * --exclude-inbound-ports 15000,15020,15021,15090 \
    --include-outbound-ip-ranges *";

use mesh_wire::redirect::testing::{DEFAULT_INBOUND, HEAD, OWNER};

#[test]
fn the_injectors_default_line_round_trips() {
    let s = spec(DEFAULT_LINE);
    assert_eq!(
        s.args()[1..].join(" "),
        DEFAULT_LINE
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(
        s.iptables_rules(),
        format!("{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n")
    );
}

#[test]
fn other_uid_gid_and_ports() {
    let s = spec(
        "--proxy-uid 2000 --proxy-gid 3000 --inbound-port 16006 --outbound-port 16001 \
         --include-inbound-ports 8080 --include-outbound-ip-ranges *",
    );
    let r = s.iptables_rules();
    assert!(r.contains("-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006\n"));
    assert!(r.contains("-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 16001\n"));
    assert!(r.contains("-A MESH_OUTPUT -m owner --uid-owner 2000 -j RETURN\n"));
    assert!(r.contains("-A MESH_OUTPUT -m owner --gid-owner 3000 -j RETURN\n"));
    assert!(r.contains("-A MESH_INBOUND -p tcp --dport 8080 -j MESH_IN_REDIRECT\n"));
    assert!(!r.contains("--dport 15000"));
}

#[test]
fn include_inbound_port_list_minus_excluded() {
    let s = spec(
        "--include-inbound-ports 8080,5678,15021 --exclude-inbound-ports 15000,15020,15021,15090 \
         --include-outbound-ip-ranges *",
    );
    assert_eq!(
        s.iptables_rules(),
        format!(
            "{HEAD}-A PREROUTING -p tcp -j MESH_INBOUND
-A MESH_INBOUND -p tcp --dport 5678 -j MESH_IN_REDIRECT
-A MESH_INBOUND -p tcp --dport 8080 -j MESH_IN_REDIRECT
{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n"
        )
    );
}

#[test]
fn no_include_inbound_means_no_inbound_capture() {
    let s = spec("--exclude-inbound-ports 15000,15020,15021,15090 --include-outbound-ip-ranges *");
    assert_eq!(
        s.iptables_rules(),
        format!("{HEAD}{OWNER}-A MESH_OUTPUT -j MESH_REDIRECT\nCOMMIT\n")
    );
}

#[test]
fn no_outbound_include_means_no_outbound_capture() {
    let s = spec("--include-inbound-ports *");
    let r = s.iptables_rules();
    assert!(!r.contains("-j MESH_REDIRECT"), "{r}");
    // The proxy's own and loopback traffic are still left alone.
    assert!(r.contains(OWNER));
}

#[test]
fn exclude_outbound_ports_and_ranges() {
    let s = spec(
        "--include-inbound-ports * --exclude-inbound-ports 15000,15020,15021,15090 \
         --exclude-outbound-ports 6379,5432 --include-outbound-ip-ranges * \
         --exclude-outbound-ip-ranges 169.254.169.254,10.0.0.0/8",
    );
    assert_eq!(
        s.iptables_rules(),
        format!(
            "{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN
-A MESH_OUTPUT -p tcp --dport 6379 -j RETURN
-A MESH_OUTPUT -d 10.0.0.0/8 -j RETURN
-A MESH_OUTPUT -d 169.254.169.254/32 -j RETURN
-A MESH_OUTPUT -j MESH_REDIRECT
COMMIT
"
        )
    );
}

#[test]
fn include_outbound_ports_and_ranges() {
    let s = spec(
        "--include-inbound-ports * --exclude-inbound-ports 15000,15020,15021,15090 \
         --include-outbound-ports 443 --include-outbound-ip-ranges 10.96.0.0/12",
    );
    assert_eq!(
        s.iptables_rules(),
        format!(
            "{HEAD}{DEFAULT_INBOUND}{OWNER}-A MESH_OUTPUT -p tcp --dport 443 -j MESH_REDIRECT
-A MESH_OUTPUT -d 10.96.0.0/12 -j MESH_REDIRECT
COMMIT
"
        )
    );
}

#[test]
fn exclude_everything_outbound() {
    let s = spec("--exclude-outbound-ports * --include-outbound-ip-ranges *");
    let r = s.iptables_rules();
    assert!(r.contains("-A MESH_OUTPUT -p tcp -j RETURN\n-A MESH_OUTPUT -j MESH_REDIRECT\n"));
    let s = spec("--exclude-outbound-ip-ranges * --include-outbound-ip-ranges *");
    let r = s.iptables_rules();
    assert!(r.contains("-A MESH_OUTPUT -j RETURN\n-A MESH_OUTPUT -j MESH_REDIRECT\n"));
}

#[test]
fn bad_flags_are_rejected() {
    let bad = |line: &str| {
        let argv = std::iter::once("redirect").chain(line.split_whitespace());
        Cli::try_parse_from(argv).is_err()
    };
    assert!(bad("--include-inbound-ports 80,x"));
    assert!(bad("--exclude-outbound-ports 0"));
    assert!(bad("--include-outbound-ip-ranges 10.0.0.0/33"));
    assert!(bad("--include-outbound-ip-ranges fe80::/10"));
    assert!(bad("--backend iptables"));
    assert!(!bad("--backend legacy"));
}

#[test]
fn cleanup_removes_the_jumps_then_the_chains() {
    let cmds: Vec<String> = cleanup_commands().iter().map(|c| c.join(" ")).collect();
    assert_eq!(
        cmds,
        [
            "-t nat -D PREROUTING -p tcp -j MESH_INBOUND",
            "-t nat -D OUTPUT -p tcp -j MESH_OUTPUT",
            "-t nat -F MESH_INBOUND",
            "-t nat -F MESH_IN_REDIRECT",
            "-t nat -F MESH_OUTPUT",
            "-t nat -F MESH_REDIRECT",
            "-t nat -X MESH_INBOUND",
            "-t nat -X MESH_IN_REDIRECT",
            "-t nat -X MESH_OUTPUT",
            "-t nat -X MESH_REDIRECT",
        ]
    );
}
