//! Where berth may connect on someone else's say-so: the one destination policy for upstream
//! redirects, token realms on another host and webhook targets (issue 9, item 12), and bounded
//! reads of bodies that a remote party controls (item 11).
//!
//! A destination passes when its scheme is `http` or `https`, its port is in the caller's
//! allowlist (empty allows any), and every address it is reached at is outside the denied
//! networks (`[egress] denied_networks`, plus the IP addresses of this node's own listeners),
//! unless an address is inside `[egress] allowed_networks`, which wins. The check applies to the
//! *resolved* address: IP literals in any spelling the URL parser accepts (`127.1`,
//! `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]`) are normalised by [`reqwest::Url`] and
//! checked here; names go through [`PolicyResolver`], which drops denied addresses from what DNS
//! answered at connect time, so a name that resolves (or later re-resolves) to loopback is
//! refused too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use reqwest::Url;

use crate::config::Config;

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// Not `http` or `https`.
    #[error("scheme {0:?} is not allowed (http or https only)")]
    Scheme(String),
    /// The URL names no host.
    #[error("URL has no host")]
    NoHost,
    /// The port is not in the relevant allowlist.
    #[error("port {port} is not allowed ({setting}: {allowed:?})")]
    Port {
        /// The port.
        port: u16,
        /// The allowlist.
        allowed: Vec<u16>,
        /// Which setting holds the allowlist.
        setting: &'static str,
    },
    /// The host is (or resolves only to) a denied address.
    #[error("{host} is at {addr}, a denied address ([egress] denied_networks or a listener of this node)")]
    Denied {
        /// Host as written.
        host: String,
        /// The denied address.
        addr: IpAddr,
    },
}

/// The destination policy: denied networks (with the node's own listener addresses) and the
/// exceptions that win over them.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    denied: Vec<IpNet>,
    allowed: Vec<IpNet>,
}

impl Default for EgressPolicy {
    /// The default denylist, no listeners, no exceptions.
    fn default() -> Self {
        EgressPolicy {
            denied: crate::config::EgressConfig::default().denied_networks,
            allowed: Vec::new(),
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The host of a URL when it is an IP address. The URL parser has already normalised every
/// spelling of an IPv4 address (`127.1`, `0x7f000001`, `2130706433`) to dotted form.
fn ip_literal(url: &Url) -> Option<IpAddr> {
    url.host_str()?.trim_matches(['[', ']']).parse().ok()
}

impl EgressPolicy {
    /// The policy of a configuration: `[egress]` plus the IP of every listener that is bound to
    /// a specific address (a listener on `0.0.0.0`/`::` adds nothing: loopback is denied by
    /// default, and the node's other addresses are the operator's to list).
    pub fn from_config(config: &Config) -> EgressPolicy {
        let mut denied = config.egress.denied_networks.clone();
        for l in &config.listen {
            let ip = canonical(l.addr.ip());
            if !ip.is_unspecified() {
                denied.push(IpNet::from(ip));
            }
        }
        EgressPolicy {
            denied,
            allowed: config.egress.allowed_networks.clone(),
        }
    }

    /// Whether berth may connect to `ip` (IPv4-mapped IPv6 is checked as IPv4).
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !self.denied.iter().any(|n| n.contains(&ip))
    }

    /// Checks what can be checked without DNS: scheme, host present, port in `allowed_ports`
    /// (empty allows any; `setting` names the option in errors), and an IP-literal host.
    pub fn check_url(
        &self,
        url: &Url,
        allowed_ports: &[u16],
        setting: &'static str,
    ) -> Result<(), EgressError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EgressError::Scheme(url.scheme().to_string()));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(EgressError::NoHost)?;
        let port = url.port_or_known_default().unwrap_or(443);
        if !allowed_ports.is_empty() && !allowed_ports.contains(&port) {
            return Err(EgressError::Port {
                port,
                allowed: allowed_ports.to_vec(),
                setting,
            });
        }
        if let Some(ip) = ip_literal(url) {
            if !self.permits(ip) {
                return Err(EgressError::Denied {
                    host: host.to_string(),
                    addr: canonical(ip),
                });
            }
        }
        Ok(())
    }

    /// [`check_url`](Self::check_url), then resolves a host name and refuses it when no address
    /// it resolves to is permitted. A name that does not resolve passes: the connection will
    /// fail on its own, and [`PolicyResolver`] checks again at connect time.
    pub async fn check_resolved(
        &self,
        url: &Url,
        allowed_ports: &[u16],
        setting: &'static str,
    ) -> Result<(), EgressError> {
        self.check_url(url, allowed_ports, setting)?;
        if ip_literal(url).is_some() {
            return Ok(());
        }
        let Some(name) = url.host_str() else {
            return Ok(());
        };
        let Ok(addrs) = tokio::net::lookup_host((name, 0)).await else {
            return Ok(());
        };
        let addrs: Vec<SocketAddr> = addrs.collect();
        match addrs.iter().find(|a| !self.permits(a.ip())) {
            Some(denied) if !addrs.iter().any(|a| self.permits(a.ip())) => {
                Err(EgressError::Denied {
                    host: name.to_string(),
                    addr: canonical(denied.ip()),
                })
            }
            _ => Ok(()),
        }
    }

    /// A DNS resolver for a reqwest client that drops denied addresses; names in `trusted` (the
    /// operator's own configured hosts) resolve unfiltered.
    pub fn resolver(self: &Arc<Self>, trusted: Vec<String>) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver {
            policy: self.clone(),
            trusted: trusted
                .into_iter()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
                .collect(),
        })
    }
}

/// A reqwest DNS resolver that applies an [`EgressPolicy`] to every address it returns.
pub struct PolicyResolver {
    policy: Arc<EgressPolicy>,
    trusted: Vec<String>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let trusted = self.trusted.contains(&host);
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if trusted {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let permitted: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                if let Some(denied) = addrs.first() {
                    tracing::warn!(host = %host, addr = %denied.ip(), "connection refused by the egress policy");
                    return Err(Box::new(EgressError::Denied {
                        host,
                        addr: canonical(denied.ip()),
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why a bounded body read stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// More bytes than the cap arrived; the rest was not read.
    #[error("body exceeds {0} bytes")]
    TooLarge(usize),
    /// The deadline passed.
    #[error("body not received in time")]
    Timeout,
    /// The connection broke.
    #[error("body broken: {0}")]
    Broken(String),
}

/// Reads a response body whole, but never more than `cap` bytes (the connection is dropped as
/// soon as more arrive), until `deadline`.
pub async fn read_capped(
    response: &mut reqwest::Response,
    cap: usize,
    deadline: Instant,
) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ReadError::TooLarge(cap));
    }
    let mut bytes = BytesMut::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), response.chunk())
            .await
            .map_err(|_| ReadError::Timeout)?
            .map_err(|e| ReadError::Broken(error_chain(&e.without_url())))?;
        let Some(chunk) = chunk else {
            return Ok(bytes.freeze());
        };
        if bytes.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge(cap));
        }
        bytes.extend_from_slice(&chunk);
    }
}

/// Reads at most `cap` bytes of a body (an error answer), stopping early without error.
pub async fn read_prefix(response: &mut reqwest::Response, cap: usize, deadline: Instant) -> Bytes {
    let mut bytes = BytesMut::new();
    while bytes.len() < cap {
        match tokio::time::timeout_at(deadline.into(), response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let take = chunk.len().min(cap - bytes.len());
                bytes.extend_from_slice(&chunk[..take]);
            }
            _ => break,
        }
    }
    bytes.freeze()
}

/// Longest excerpt of a remote party's text that berth repeats to its clients.
pub const EXCERPT_CHARS: usize = 200;

/// A short, printable excerpt of text a remote party sent: control characters become spaces,
/// runs of whitespace collapse, the user-info of URLs (`scheme://user:password@`) is replaced by
/// `scheme://***@`, and at most [`EXCERPT_CHARS`] characters are kept (an ellipsis marks a cut).
pub fn excerpt(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = redact_userinfo(&text);
    let mut out = String::new();
    let mut count = 0;
    let mut space = false;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if space || out.is_empty() {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if count == EXCERPT_CHARS {
            out.push('…');
            return out.trim_end().to_string();
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_string()
}

/// Replaces `user[:password]@` after every `://` with `***@`.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let authority_end = rest
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            out.push_str("***");
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

/// An error with its causes (reqwest hides the useful part in `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn address_policy_table() {
        let p = EgressPolicy::default();
        // (URL, refused by default)
        let table = [
            ("http://127.0.0.1/", true),
            ("http://127.1/", true),
            ("http://0x7f000001/", true),
            ("http://2130706433/", true),
            ("http://0177.0.0.1/", true),
            ("http://[::1]/", true),
            ("http://[::ffff:127.0.0.1]/", true),
            ("http://[::ffff:7f00:1]/", true),
            ("http://[::]/", true),
            ("http://0.0.0.0/", true),
            ("http://0/", true),
            ("http://169.254.169.254/latest/meta-data", true),
            ("http://[fe80::1]/", true),
            ("http://[::ffff:169.254.169.254]/", true),
            ("http://10.0.0.1/", false),
            ("http://192.168.1.20:5000/", false),
            ("http://172.16.0.1/", false),
            ("https://93.184.215.14/", false),
            ("http://[2001:db8::1]/", false),
            ("https://registry.example/", false),
        ];
        for (u, refused) in table {
            let r = p.check_url(&url(u), &[], "pull_through.allowed_ports");
            assert_eq!(r.is_err(), refused, "{u}: {r:?}");
            if refused {
                assert!(matches!(r, Err(EgressError::Denied { .. })), "{u}: {r:?}");
            }
        }
    }

    #[test]
    fn scheme_port_listeners_and_exceptions() {
        let p = EgressPolicy::default();
        let ports = [80, 443];
        assert!(matches!(
            p.check_url(&url("ftp://example.com/"), &[], "x"),
            Err(EgressError::Scheme(_))
        ));
        assert!(matches!(
            p.check_url(&url("file:///etc/passwd"), &[], "x"),
            Err(EgressError::Scheme(_))
        ));
        assert!(matches!(
            p.check_url(&url("http://example.com:22/"), &ports, "x"),
            Err(EgressError::Port { port: 22, .. })
        ));
        assert!(p
            .check_url(&url("https://example.com/"), &ports, "x")
            .is_ok());

        let mut c = Config::default();
        c.listen[0].addr = "10.1.2.3:5000".parse().unwrap();
        c.egress.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
        let p = EgressPolicy::from_config(&c);
        assert!(!p.permits("10.1.2.3".parse().unwrap()), "own listener");
        assert!(p.permits("10.1.2.4".parse().unwrap()));
        assert!(p.permits("127.0.0.1".parse().unwrap()), "exception wins");
        assert!(!p.permits("::1".parse().unwrap()), "not excepted");
        c.egress.denied_networks.clear();
        c.egress.allowed_networks.clear();
        c.listen[0].addr = "0.0.0.0:5000".parse().unwrap();
        let open = EgressPolicy::from_config(&c);
        assert!(open.permits("127.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn names_are_checked_where_they_resolve() {
        let p = Arc::new(EgressPolicy::default());
        let r = p
            .check_resolved(&url("http://localhost:8080/"), &[], "x")
            .await;
        assert!(matches!(r, Err(EgressError::Denied { .. })), "{r:?}");
        use reqwest::dns::Resolve as _;
        let resolver = p.resolver(vec![]);
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(resolver.resolve(name).await.is_err());
        let trusting = p.resolver(vec!["LOCALHOST".into()]);
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(trusting
            .resolve(name)
            .await
            .is_ok_and(|mut a| a.next().is_some()));
    }

    #[test]
    fn excerpts_are_short_printable_and_without_credentials() {
        let mut raw =
            b"denied: see https://admin:s3cret@internal.example:8443/path?x=1 \x1b[31m\r\nnow"
                .to_vec();
        raw.extend(std::iter::repeat_n(b'x', 10_000));
        let e = excerpt(&raw);
        assert!(!e.contains("s3cret") && !e.contains("admin"), "{e}");
        assert!(e.contains("https://***@internal.example:8443/path"), "{e}");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1, "{e}");
        assert!(e.ends_with('…'));
        assert_eq!(excerpt(b"  short\n\ttext "), "short text");
        assert_eq!(redact_userinfo("a http://h/x@y b"), "a http://h/x@y b");
    }
}
