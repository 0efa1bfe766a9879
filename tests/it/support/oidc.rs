//! A real OAuth server: npm `oidc-provider` (OpenID certified) run by Node.js from
//! `tests/oidc/provider.mjs` on a loopback port, and an independent JOSE verifier (npm `jose`,
//! `tests/oidc/verify.mjs`) for the JWTs phantom-authz mints. `scripts/test.sh` installs both
//! from the lockfile in `tests/oidc`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::spawn_tied;

/// The fixture's directory, holding its scripts and `node_modules`.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

fn node() -> Command {
    let dir = fixture_dir();
    assert!(
        dir.join("node_modules/oidc-provider").is_dir(),
        "the OAuth server is not installed: run `npm ci --prefix tests/oidc` (scripts/test.sh does)"
    );
    let mut command = Command::new("node");
    command.current_dir(dir);
    command
}

/// How to start the OAuth server.
#[derive(Default)]
pub(crate) struct OidcOptions<'a> {
    /// The access tokens' lifetime in seconds (oidc-provider's 600 when unset).
    pub(crate) access_token_ttl: Option<u64>,
    /// Registers client `gw-jwt` for `private_key_jwt` with this PEM private key's public half.
    pub(crate) client_key_file: Option<&'a Path>,
    /// A fixed port, for a server that starts after the service looks for it.
    pub(crate) port: Option<u16>,
}

/// A running oidc-provider; killed when dropped.
pub(crate) struct OidcProvider {
    child: Child,
    /// Its issuer identifier, `http://127.0.0.1:<port>`.
    pub(crate) issuer: String,
    _log: tempfile::TempDir,
}

impl OidcProvider {
    pub(crate) fn start(options: OidcOptions<'_>) -> OidcProvider {
        let log = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(log.path().join("stderr")).unwrap();
        let mut command = node();
        command
            .arg("provider.mjs")
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Some(ttl) = options.access_token_ttl {
            command.env("ACCESS_TOKEN_TTL", ttl.to_string());
        }
        if let Some(path) = options.client_key_file {
            command.env("PROVIDER_CLIENT_KEY_FILE", path);
        }
        if let Some(port) = options.port {
            command.env("PROVIDER_PORT", port.to_string());
        }
        let mut child = spawn_tied(&mut command);
        // Its first line on stdout says where it listens, once it does.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // Whatever else it prints is drained: a closed pipe would kill it at its next write.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(log.path().join("stderr")).unwrap_or_default();
            panic!("oidc-provider did not start: {stderr}")
        });
        OidcProvider {
            child,
            issuer: started["issuer"].as_str().unwrap().to_owned(),
            _log: log,
        }
    }

    /// Its RFC 7662 introspection endpoint.
    pub(crate) fn introspection_url(&self) -> String {
        format!("{}/token/introspection", self.issuer)
    }

    /// A fresh client-credentials access token for client `app` with scopes `read write`.
    pub(crate) async fn token(&self) -> String {
        let response = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .basic_auth("app", Some("app-secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[
                ("grant_type", "client_credentials"),
                ("scope", "read write"),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "token request");
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Revokes `token` at the server's RFC 7009 revocation endpoint, as client `app`.
    pub(crate) async fn revoke(&self, token: &str) {
        let response = reqwest::Client::new()
            .post(format!("{}/token/revocation", self.issuer))
            .basic_auth("app", Some("app-secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", token)]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "revocation");
    }

    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Verifies `jwt` with npm `jose` against the JWKS at `jwks_url`, requiring `issuer` and type
/// `at+jwt`; returns its header and claims, `{"header": …, "payload": …}`, or the reason it failed.
pub(crate) async fn verify_jwt(
    jwks_url: &str,
    issuer: &str,
    jwt: &str,
) -> Result<serde_json::Value, String> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::from(node())
        .args(["verify.mjs", jwks_url, issuer])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(jwt.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A new private key for `alg` (`ES256`, `EdDSA` or `RS256`) in the PEM PKCS#8 file `name` in
/// `dir`, made by Node's crypto, for signing JWTs or client assertions.
pub(crate) fn key_file(dir: &Path, name: &str, alg: &str) -> PathBuf {
    let output = node().args(["keygen.mjs", alg]).output().unwrap();
    assert!(output.status.success(), "keygen {alg}: {output:?}");
    let path = dir.join(name);
    std::fs::write(&path, output.stdout).unwrap();
    path
}
