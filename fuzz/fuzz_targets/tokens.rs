//! Bearer tokens from the upgrade: verifying an arbitrary string must never
//! panic and never accept what the secret did not sign.
#![no_main]
use chat_protocol::token::{mint, TokenVerifier};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzzing-secret-0123456789abcdef0123456789";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let verifier = TokenVerifier::new(SECRET);
    if let Ok(claims) = verifier.verify(text, 1_800_000_000) {
        // Accepted: it must be a token this secret signs the same way.
        let again = mint(SECRET, &claims.sub, &claims.dev, claims.iat, claims.exp).unwrap();
        assert!(verifier.verify(&again, 1_800_000_000).is_ok());
    }
});
