//! The proxy's listeners: one per port of the served Gateway listeners, with a virtual host
//! per hostname holding the attached routes in precedence order.

use std::collections::{BTreeMap, BTreeSet};

use mesh_config::{Listener, ListenerKind, ListenerProtocol, VirtualHost};

use super::Ctx;
use super::attachment::Entry;
use super::gateways::Gw;
use crate::hostname;
use crate::precedence::PrecedenceKey;

pub(super) fn build_listeners(
    cx: &mut Ctx<'_>,
    gws: &[Gw<'_>],
    entries: Vec<Entry>,
) -> Vec<Listener> {
    // port → gateway listener names
    let mut ports: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for g in gws {
        for l in g.listeners.iter().filter(|l| l.usable) {
            ports
                .entry(l.port)
                .or_default()
                .push(format!("{}/{}/{}", g.ns, g.name, l.name));
        }
    }
    let mut by_port: BTreeMap<u16, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        by_port.entry(e.port).or_default().push(e);
    }
    let mut listeners = Vec::new();
    for (port, names) in ports {
        let entries = by_port.remove(&port).unwrap_or_default();
        let mut hosts: Vec<&String> = entries.iter().flat_map(|e| &e.hostnames).collect();
        hosts.sort_by_key(|h| hostname::specificity(h));
        hosts.dedup();
        let mut used_names = BTreeSet::new();
        let mut virtual_hosts = Vec::new();
        for h in hosts {
            let mut members: Vec<(_, &PrecedenceKey, usize)> = entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.hostnames
                        .iter()
                        .filter(|eh| hostname::matches(eh, h))
                        .map(|eh| hostname::specificity(eh))
                        .min()
                        .map(|s| (s, &e.key, i))
                })
                .collect();
            members.sort();
            let mut routes = Vec::new();
            let mut in_vhost = BTreeSet::new();
            for (_, _, i) in members {
                // The same route match attached through two listeners of this port: once.
                if !in_vhost.insert(entries[i].route.name.as_str()) {
                    continue;
                }
                let mut r = entries[i].route.clone();
                // Route names are unique per listener: a route keeps its name in the virtual
                // host of its own (first) hostname and gets `@host` elsewhere.
                let own = entries[i].hostnames.contains(h);
                if !own || !used_names.insert(r.name.clone()) {
                    r.name = format!("{}@{h}", r.name);
                    used_names.insert(r.name.clone());
                }
                routes.push(r);
            }
            virtual_hosts.push(VirtualHost {
                name: h.clone(),
                hostnames: vec![h.clone()],
                routes,
            });
        }
        let name = if names.len() == 1 {
            names[0].clone()
        } else {
            format!("port-{port}")
        };
        listeners.push(Listener {
            passthrough_identities: Default::default(),
            mtls: Default::default(),
            name,
            address: None,
            port,
            kind: ListenerKind::Gateway,
            protocol: ListenerProtocol::Http,
            virtual_hosts,
            rate_limit: cx.port_limits.get(&port).cloned().filter(|s| !s.is_empty()),
            limits: Default::default(),
            services: Vec::new(),
            inbound_ports: Vec::new(),
        });
    }
    listeners
}
