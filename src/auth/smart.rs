//! SMART Backend Services: a signed client assertion (RS384 or ES384) traded for an access
//! token at the token endpoint, found in `.well-known/smart-configuration` unless given.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::info;
use url::Url;

use crate::auth::Secret;
use crate::error::SourceError;

/// Lifetime of a client assertion; the guide allows at most five minutes.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// The assertion type of the `client_credentials` grant with a JWT.
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Settings of a SMART backend client.
#[derive(Debug, Clone)]
pub struct SmartConfig {
    /// The client id registered with the authorization server.
    pub client_id: String,
    /// The private key in PEM (RSA for RS384, P-384 EC for ES384).
    pub key_pem: Vec<u8>,
    /// The token endpoint; discovered from the FHIR base when absent.
    pub token_url: Option<Url>,
    /// The scopes asked for.
    pub scope: String,
    /// The `kid` header naming the key in the client's JWKS, if the server needs it.
    pub kid: Option<String>,
}

/// A SMART backend client: signs assertions and fetches access tokens.
pub struct SmartClient {
    config: SmartConfig,
    key: EncodingKey,
    algorithm: Algorithm,
    token_url: OnceCell<Url>,
    jti_counter: AtomicU64,
    jti_seed: RandomState,
}

impl std::fmt::Debug for SmartClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartClient")
            .field("client_id", &self.config.client_id)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    jti: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct Configuration {
    token_endpoint: String,
}

/// A fresh access token and how long it lives.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The bearer token.
    pub token: Secret,
    /// Its lifetime from now, as the server said (`expires_in`), if it said.
    pub lifetime: Option<Duration>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl SmartClient {
    /// A client for `config`; fails when the key is neither an RSA nor a P-384 EC key.
    pub fn new(config: SmartConfig) -> Result<Self, SourceError> {
        let (key, algorithm) = if let Ok(key) = EncodingKey::from_rsa_pem(&config.key_pem) {
            (key, Algorithm::RS384)
        } else if let Ok(key) = EncodingKey::from_ec_pem(&config.key_pem) {
            (key, Algorithm::ES384)
        } else {
            return Err(SourceError::Config(
                "the SMART key is neither an RSA nor an EC private key in PEM".into(),
            ));
        };
        let token_url = OnceCell::new_with(config.token_url.clone());
        Ok(Self {
            config,
            key,
            algorithm,
            token_url,
            jti_counter: AtomicU64::new(0),
            jti_seed: RandomState::new(),
        })
    }

    /// The signing algorithm chosen from the key.
    #[cfg(test)]
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    async fn token_url(&self, client: &reqwest::Client, base: &Url) -> Result<Url, SourceError> {
        let url = self
            .token_url
            .get_or_try_init(|| async {
                let well_known = format!(
                    "{}/.well-known/smart-configuration",
                    base.as_str().trim_end_matches('/')
                );
                let response = client
                    .get(&well_known)
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .map_err(|e| SourceError::Transport(e.without_url().to_string()))?;
                if !response.status().is_success() {
                    return Err(SourceError::Status(response.status().as_u16()));
                }
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| SourceError::Transport(e.without_url().to_string()))?;
                let found: Configuration = serde_json::from_slice(&body).map_err(|e| {
                    SourceError::BadBody(format!("smart-configuration without token_endpoint: {e}"))
                })?;
                let url = base.join(&found.token_endpoint).map_err(|e| {
                    SourceError::BadBody(format!(
                        "bad token_endpoint {:?}: {e}",
                        found.token_endpoint
                    ))
                })?;
                info!(token_endpoint = %url, "SMART token endpoint discovered");
                Ok(url)
            })
            .await?;
        Ok(url.clone())
    }

    /// A signed client assertion for `audience` (the token endpoint).
    pub fn assertion(&self, audience: &str) -> Result<String, SourceError> {
        let now = unix_now();
        let n = self.jti_counter.fetch_add(1, Ordering::Relaxed);
        let jti = format!("{:016x}{:016x}", self.jti_seed.hash_one((now, n)), n);
        let claims = Claims {
            iss: &self.config.client_id,
            sub: &self.config.client_id,
            aud: audience,
            exp: now + ASSERTION_LIFETIME.as_secs(),
            iat: now,
            jti,
        };
        let mut header = Header::new(self.algorithm);
        header.kid = self.config.kid.clone();
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| SourceError::Config(format!("cannot sign the SMART assertion: {e}")))
    }

    /// Asks the token endpoint for a new access token.
    pub async fn issue(&self, client: &reqwest::Client, base: &Url) -> Result<Issued, SourceError> {
        let token_url = self.token_url(client, base).await?;
        let assertion = self.assertion(token_url.as_str())?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &self.config.scope)
            .append_pair("client_assertion_type", ASSERTION_TYPE)
            .append_pair("client_assertion", &assertion)
            .finish();
        let response = client
            .post(token_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| SourceError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        // A refused client is an authentication failure; anything else is the server's fault.
        if matches!(status.as_u16(), 400 | 401 | 403) {
            return Err(SourceError::Unauthorized);
        }
        if !status.is_success() {
            return Err(SourceError::Status(status.as_u16()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| SourceError::Transport(e.without_url().to_string()))?;
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| SourceError::BadBody("token response without access_token".into()))?;
        let token = Secret::new(&answer.access_token)
            .ok_or_else(|| SourceError::BadBody("empty access_token".into()))?;
        Ok(Issued { token, lifetime: answer.expires_in.map(Duration::from_secs) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(key: &str) -> SmartClient {
        let path = format!("{}/tests/fixtures/{key}", env!("CARGO_MANIFEST_DIR"));
        SmartClient::new(SmartConfig {
            client_id: "fhirfs-test".into(),
            key_pem: std::fs::read(path).unwrap(),
            token_url: Some(Url::parse("https://auth.example/token").unwrap()),
            scope: "system/Binary.read".into(),
            kid: Some("k1".into()),
        })
        .unwrap()
    }

    #[test]
    fn the_key_type_chooses_the_algorithm() {
        assert_eq!(client("smart-rs384.key.pem").algorithm(), Algorithm::RS384);
        assert_eq!(client("smart-es384.key.pem").algorithm(), Algorithm::ES384);
        let bad = SmartConfig {
            client_id: "x".into(),
            key_pem: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
            token_url: None,
            scope: String::new(),
            kid: None,
        };
        assert!(SmartClient::new(bad).is_err());
    }

    #[test]
    fn assertions_verify_with_the_public_key_and_have_unique_jtis() {
        for (key, public, algorithm) in [
            ("smart-rs384.key.pem", "smart-rs384.pub.pem", Algorithm::RS384),
            ("smart-es384.key.pem", "smart-es384.pub.pem", Algorithm::ES384),
        ] {
            let client = client(key);
            let path = format!("{}/tests/fixtures/{public}", env!("CARGO_MANIFEST_DIR"));
            let pem = std::fs::read(path).unwrap();
            let decoding = match algorithm {
                Algorithm::RS384 => jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap(),
                _ => jsonwebtoken::DecodingKey::from_ec_pem(&pem).unwrap(),
            };
            let mut validation = jsonwebtoken::Validation::new(algorithm);
            validation.set_audience(&["https://auth.example/token"]);
            validation.set_issuer(&["fhirfs-test"]);
            let mut jtis = std::collections::HashSet::new();
            for _ in 0..3 {
                let jwt = client.assertion("https://auth.example/token").unwrap();
                let data = jsonwebtoken::decode::<serde_json::Value>(&jwt, &decoding, &validation)
                    .unwrap();
                assert_eq!(data.header.kid.as_deref(), Some("k1"));
                assert_eq!(data.claims["sub"], "fhirfs-test");
                let exp = data.claims["exp"].as_u64().unwrap();
                assert!(exp <= unix_now() + 300, "exp at most five minutes ahead");
                assert!(jtis.insert(data.claims["jti"].as_str().unwrap().to_owned()));
            }
        }
    }
}
