//! What a route requires of a token, and whether a grant meets it. Pure.
//!
//! The requirement comes from Envoy's per-route `context_extensions` (`required_scopes`,
//! `required_audience`) when either is present, and otherwise from the first rule of the route
//! table (the `[[route]]` entries of the `--config` file) that matches the request's host, path
//! and method. It is checked on every allow, cache hits included, against claims read once when
//! the token was introspected.

use crate::request::{CheckRequest, Entries as _, HttpRequest};

use crate::cache::Grant;
use crate::decision::Outcome;

/// The context extension naming the scopes a route requires (space-separated, all required).
pub const REQUIRED_SCOPES: &str = "required_scopes";
/// The context extension naming the audience a route requires.
pub const REQUIRED_AUDIENCE: &str = "required_audience";

/// What to do with a request no rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Unmatched {
    /// An active token is enough.
    #[default]
    Allow,
    /// Denied (403), without asking the identity server.
    Deny,
}

/// The route table: rules tried in order, the first match applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub rules: Vec<Rule>,
    pub unmatched: Unmatched,
}

/// One rule: which requests it matches, and what it requires of their tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Matches this host only (case-insensitive, port ignored); any host when `None`.
    pub host: Option<String>,
    pub path: PathMatch,
    /// Matches these methods only (upper case); any method when empty.
    pub methods: Vec<String>,
    /// Every one of these must be held.
    pub scopes: Vec<String>,
    pub audience: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PathMatch {
    #[default]
    Any,
    /// The path (without its query) starts with this.
    Prefix(String),
    /// The path (without its query) is exactly this.
    Exact(String),
}

/// What one Check's route demands.
#[derive(Debug, PartialEq, Eq)]
pub enum Demand<'a> {
    /// An active token is enough.
    Nothing,
    /// These scopes (all of them) and this audience.
    Require {
        scopes: Vec<&'a str>,
        audience: Option<&'a str>,
    },
    /// No rule matched and unmatched requests are denied.
    NoRoute,
    /// A route setting from Envoy is malformed: an operator's mistake, which must not open the
    /// route.
    Misconfigured(&'static str),
}

impl RouteTable {
    /// What `request`'s route demands.
    pub fn demand<'a>(&'a self, request: &'a CheckRequest) -> Demand<'a> {
        // Each key looked up once, and not at all when Envoy sends no extensions (most Checks).
        let extensions = request.context_extensions();
        let (scopes, audience) = if extensions.is_empty() {
            (None, None)
        } else {
            (
                extensions.named(REQUIRED_SCOPES),
                extensions.named(REQUIRED_AUDIENCE),
            )
        };
        if scopes.is_some() || audience.is_some() {
            return from_extensions(scopes, audience);
        }
        if self.rules.is_empty() && self.unmatched == Unmatched::Allow {
            return Demand::Nothing;
        }
        let http = request.http();
        let method = http.map_or("", HttpRequest::method);
        let path = http.map_or("", HttpRequest::path);
        let path = normalize_path(path.split(['?', '#']).next().unwrap_or_default());
        let host = http.map_or("", HttpRequest::host);
        match self
            .rules
            .iter()
            .find(|rule| rule.matches(host, &path, method))
        {
            Some(rule) if rule.scopes.is_empty() && rule.audience.is_none() => Demand::Nothing,
            Some(rule) => Demand::Require {
                scopes: rule.scopes.iter().map(String::as_str).collect(),
                audience: rule.audience.as_deref(),
            },
            None => match self.unmatched {
                Unmatched::Allow => Demand::Nothing,
                Unmatched::Deny => Demand::NoRoute,
            },
        }
    }
}

impl Rule {
    fn matches(&self, host: &str, path: &str, method: &str) -> bool {
        let host_matches = self.host.as_deref().is_none_or(|wanted| {
            let host = host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            });
            // `api.example.` is `api.example`.
            let host = host.strip_suffix('.').unwrap_or(host);
            host.eq_ignore_ascii_case(wanted.strip_suffix('.').unwrap_or(wanted))
        });
        let path_matches = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
        };
        let method_matches =
            self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        host_matches && path_matches && method_matches
    }
}

/// The path as the API will understand it (RFC 3986 §6.2.2): percent-encoded unreserved
/// characters decoded (`%61` is `a`), repeated slashes merged and dot segments removed, so that
/// `//admin`, `/./admin`, `/%61dmin` and `/public/../admin` all meet the rules for `/admin`.
/// Other percent-encodings (`%2F`) stay as they are.
pub fn normalize_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(value) = u8::from_str_radix(hex, 16)
            && (value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(char::from(value));
            i += 3;
            continue;
        }
        // `path` is a `&str`: copy its characters, not its bytes.
        let ch = path[i..].chars().next().unwrap_or_default();
        decoded.push(ch);
        i += ch.len_utf8();
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    // A trailing slash is kept: `/orders/` and `/orders` may differ to the API.
    if decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || segments.is_empty()
    {
        normalized.push('/');
    }
    normalized
}

fn from_extensions<'a>(scopes: Option<&'a str>, audience: Option<&'a str>) -> Demand<'a> {
    let scopes = match scopes {
        None => Vec::new(),
        Some(scopes) => match parse_scopes(scopes) {
            Some(scopes) => scopes,
            None => return Demand::Misconfigured(REQUIRED_SCOPES),
        },
    };
    let audience = match audience {
        None => None,
        Some(audience) if is_audience(audience) => Some(audience),
        Some(_) => return Demand::Misconfigured(REQUIRED_AUDIENCE),
    };
    Demand::Require { scopes, audience }
}

/// Space-separated RFC 6749 scope-tokens, at least one; `None` if malformed.
pub fn parse_scopes(scopes: &str) -> Option<Vec<&str>> {
    let scopes: Vec<&str> = scopes.split(' ').filter(|s| !s.is_empty()).collect();
    (!scopes.is_empty() && scopes.iter().all(|scope| is_scope_token(scope))).then_some(scopes)
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`: no space, `"` or `\`, so a
/// scope is safe inside a `WWW-Authenticate` quoted-string.
pub fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// An audience: printable ASCII, no spaces.
pub fn is_audience(audience: &str) -> bool {
    !audience.is_empty() && audience.bytes().all(|b| b.is_ascii_graphic())
}

impl Demand<'_> {
    /// Whether the grant's claims meet the demand: `None` when they do, else the denial.
    pub fn refusal(&self, grant: &Grant) -> Option<Outcome> {
        match self {
            Demand::Nothing => None,
            Demand::NoRoute | Demand::Misconfigured(_) => self.refuses_any_token(),
            Demand::Require { scopes, audience } => {
                if let Some(audience) = audience
                    && !grant.has_audience(audience)
                {
                    return Some(Outcome::AudienceMismatch);
                }
                if scopes.iter().all(|scope| grant.has_scope(scope)) {
                    None
                } else {
                    Some(Outcome::InsufficientScope(scopes.join(" ").into()))
                }
            }
        }
    }

    /// A denial that needs no token at all: the route itself refuses.
    pub fn refuses_any_token(&self) -> Option<Outcome> {
        match self {
            Demand::NoRoute => Some(Outcome::NoRoute),
            Demand::Misconfigured(setting) => Some(Outcome::RouteMisconfigured(setting)),
            Demand::Nothing | Demand::Require { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::Claims;
    use crate::token;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest as EnvoyHttp;

    fn request(method: &str, host: &str, path: &str, extensions: &[(&str, &str)]) -> CheckRequest {
        let mut request = token::check_request(EnvoyHttp {
            method: method.into(),
            host: host.into(),
            path: path.into(),
            ..Default::default()
        });
        if let Some(attributes) = request.attributes.as_mut() {
            attributes.context_extensions = extensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        CheckRequest::from_envoy(&request).unwrap()
    }

    fn claims(scopes: &[&str], audiences: &[&str]) -> Grant {
        let claims = Claims {
            scopes: scopes.iter().map(|s| Box::from(*s)).collect(),
            audiences: audiences.iter().map(|s| Box::from(*s)).collect(),
            ..Claims::default()
        };
        Grant::new("a.b.c", &claims)
    }

    fn table() -> RouteTable {
        RouteTable {
            rules: vec![
                Rule {
                    path: PathMatch::Prefix("/orders".into()),
                    methods: vec!["POST".into()],
                    scopes: vec!["orders:write".into()],
                    ..Rule::default()
                },
                Rule {
                    host: Some("admin.example".into()),
                    audience: Some("admin-api".into()),
                    ..Rule::default()
                },
                Rule {
                    path: PathMatch::Exact("/health".into()),
                    ..Rule::default()
                },
            ],
            unmatched: Unmatched::Deny,
        }
    }

    #[test]
    fn the_first_matching_rule_applies() {
        let table = table();
        let post = request("POST", "api.example", "/orders/7?x=1", &[]);
        assert_eq!(
            table.demand(&post),
            Demand::Require {
                scopes: vec!["orders:write"],
                audience: None
            }
        );
        let get = request("GET", "api.example", "/orders/7", &[]);
        assert_eq!(table.demand(&get), Demand::NoRoute);
        let admin = request("GET", "ADMIN.example:8443", "/anything", &[]);
        assert_eq!(
            table.demand(&admin),
            Demand::Require {
                scopes: vec![],
                audience: Some("admin-api")
            }
        );
        let health = request("GET", "api.example", "/health", &[]);
        assert_eq!(table.demand(&health), Demand::Nothing);
        assert_eq!(
            table.demand(&request("GET", "api.example", "/healthz", &[])),
            Demand::NoRoute
        );
    }

    #[test]
    fn paths_are_matched_as_the_api_will_read_them() {
        for (raw, normal) in [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/a/b/../../admin/", "/admin/"),
            ("/../admin", "/admin"),
            ("/", "/"),
            ("", "/"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf\u{e9}/x", "/caf\u{e9}/x"),
            ("/x%", "/x%"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw:?}");
        }
        let table = RouteTable {
            rules: vec![Rule {
                path: PathMatch::Prefix("/admin".into()),
                scopes: vec!["admin".into()],
                ..Rule::default()
            }],
            unmatched: Unmatched::Allow,
        };
        for sneaky in [
            "//admin",
            "/./admin/x",
            "/%61dmin",
            "/public/../admin",
            "/admin?x=/y",
        ] {
            assert_eq!(
                table.demand(&request("GET", "api.example.", sneaky, &[])),
                Demand::Require {
                    scopes: vec!["admin"],
                    audience: None
                },
                "{sneaky}"
            );
        }
    }

    #[test]
    fn context_extensions_override_the_table() {
        let table = table();
        let get = request(
            "GET",
            "api.example",
            "/orders",
            &[(REQUIRED_SCOPES, "a  b")],
        );
        assert_eq!(
            table.demand(&get),
            Demand::Require {
                scopes: vec!["a", "b"],
                audience: None
            }
        );
        for bad in ["", "   ", "a \"b\"", "a\\b", "é"] {
            let request = request("GET", "h", "/", &[(REQUIRED_SCOPES, bad)]);
            assert_eq!(
                table.demand(&request),
                Demand::Misconfigured(REQUIRED_SCOPES),
                "{bad:?}"
            );
        }
        let request = request("GET", "h", "/", &[(REQUIRED_AUDIENCE, "a b")]);
        assert_eq!(
            table.demand(&request),
            Demand::Misconfigured(REQUIRED_AUDIENCE)
        );
    }

    #[test]
    fn every_required_scope_must_be_held_and_the_audience_listed() {
        let demand = Demand::Require {
            scopes: vec!["read", "write"],
            audience: Some("api"),
        };
        assert_eq!(demand.refusal(&claims(&["write", "read"], &["api"])), None);
        assert_eq!(
            demand.refusal(&claims(&["read"], &["api"])),
            Some(Outcome::InsufficientScope("read write".into()))
        );
        assert_eq!(
            demand.refusal(&claims(&["read", "write"], &["other"])),
            Some(Outcome::AudienceMismatch)
        );
        assert_eq!(Demand::Nothing.refusal(&claims(&[], &[])), None);
        assert_eq!(Demand::NoRoute.refuses_any_token(), Some(Outcome::NoRoute));
    }
}
