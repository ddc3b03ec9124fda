//! The native config file (`mesh-proxy run --config`, `mesh-proxy sidecar --config`).

use std::path::Path;

use anyhow::{Context, bail};

use crate::config::ProxyConfig;

/// Reads a native config file (YAML, or JSON when it ends in `.json` or starts with `{`) and
/// validates it; errors name the file and each field.
pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
    let file = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{file}: cannot read"))?;
    if text.trim().is_empty() {
        // Most likely caught between truncate and write; an empty config would drop every
        // listener.
        bail!("{file}: the file is empty");
    }
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let config: ProxyConfig = if is_json {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
    } else {
        serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?
    };
    if let Err(errs) = config.validate() {
        let lines: Vec<String> = errs.iter().map(|e| format!("{file}: {e}")).collect();
        bail!("invalid config:\n{}", lines.join("\n"));
    }
    Ok(config)
}
