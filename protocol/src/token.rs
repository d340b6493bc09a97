//! Bearer tokens: JWTs signed with HS256 whose claims are `sub`, `dev`, `exp`
//! and `iat` (issued at: a token issued before its device was revoked is refused).
//!
//! Owns minting (for `gateway token` and tests) and verification. Verification
//! takes the current time as an argument instead of reading a clock, so expiry
//! is testable; signature and algorithm checks come from `jsonwebtoken`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::is_valid_id;

/// Seconds of clock skew tolerated between the token issuer and this node.
pub const EXPIRY_LEEWAY_S: u64 = 5;

/// The claims the gateway reads. Other claims are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Device id.
    pub dev: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch; 0 when absent (a token
    /// without it is older than any revocation).
    #[serde(default)]
    pub iat: u64,
}

/// Why a token was refused. The client is always at fault; retrying the same
/// token cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token given")]
    Missing,
    #[error("token is not a valid HS256 JWT signed with this node's secret")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("`sub` or `dev` is not 1-64 characters of [A-Za-z0-9_.-]")]
    BadId,
}

/// Signs a token issued at `iat_unix_s`. Refuses ids the gateway would refuse.
pub fn mint(
    secret: &[u8],
    user_id: &str,
    device_id: &str,
    iat_unix_s: u64,
    exp_unix_s: u64,
) -> Result<String, TokenError> {
    if !is_valid_id(user_id) || !is_valid_id(device_id) {
        return Err(TokenError::BadId);
    }
    let claims = Claims {
        sub: user_id.to_owned(),
        dev: device_id.to_owned(),
        exp: exp_unix_s,
        iat: iat_unix_s,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| TokenError::Invalid)
}

/// Verifies tokens against one secret. Built once per shard at start-up.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against the caller's clock.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks signature, algorithm, expiry and id grammar.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let claims = data.claims;
        if claims.exp.saturating_add(EXPIRY_LEEWAY_S) < now_unix_s {
            return Err(TokenError::Expired);
        }
        if !is_valid_id(&claims.sub) || !is_valid_id(&claims.dev) {
            return Err(TokenError::BadId);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_minted_token_verifies_and_carries_its_claims() {
        let token = mint(SECRET, "alice", "phone", NOW, NOW + 60).unwrap();
        let claims = TokenVerifier::new(SECRET).verify(&token, NOW).unwrap();
        assert_eq!(
            claims,
            Claims {
                sub: "alice".into(),
                dev: "phone".into(),
                exp: NOW + 60,
                iat: NOW,
            }
        );
    }

    #[test]
    fn a_token_signed_with_another_secret_is_invalid() {
        let token = mint(
            b"another secret entirely, 32 bytes",
            "alice",
            "phone",
            NOW,
            NOW + 60,
        )
        .unwrap();
        assert_eq!(
            TokenVerifier::new(SECRET).verify(&token, NOW),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn an_expired_token_is_refused_after_the_leeway() {
        let token = mint(SECRET, "alice", "phone", NOW - 60, NOW).unwrap();
        let verifier = TokenVerifier::new(SECRET);
        assert!(verifier.verify(&token, NOW + EXPIRY_LEEWAY_S).is_ok());
        assert_eq!(
            verifier.verify(&token, NOW + EXPIRY_LEEWAY_S + 1),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn garbage_and_empty_tokens_are_refused() {
        let verifier = TokenVerifier::new(SECRET);
        assert_eq!(verifier.verify("", NOW), Err(TokenError::Missing));
        assert_eq!(verifier.verify("not.a.jwt", NOW), Err(TokenError::Invalid));
        assert_eq!(verifier.verify("a.b", NOW), Err(TokenError::Invalid));
    }

    #[test]
    fn a_token_with_alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","dev":"phone","exp":9999999999} . (empty)
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImRldiI6InBob25lIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(
            TokenVerifier::new(SECRET).verify(token, NOW),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn ids_outside_the_grammar_are_refused_at_mint_and_at_verify() {
        assert_eq!(
            mint(SECRET, "al ice", "phone", NOW, NOW),
            Err(TokenError::BadId)
        );
        // A validly signed token whose sub breaks the grammar (minted by another issuer).
        let claims = Claims {
            sub: "al ice".into(),
            dev: "phone".into(),
            exp: NOW + 60,
            iat: NOW,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            TokenVerifier::new(SECRET).verify(&token, NOW),
            Err(TokenError::BadId)
        );
    }
}
