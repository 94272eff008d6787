//! Who may open a session. The server asks an [`Authenticator`] about the
//! token in every `Hello`; the balancer's signed leases plug in here.

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who holds the token, for logs.
    pub subject: String,
    /// Memory quota for the session, when the token sets one.
    pub memory_quota: Option<u64>,
    /// Session id to use, when the token was issued for one session (a
    /// worker process's ticket).
    pub session_id: Option<u64>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no session token presented")]
    Missing,
    /// The token is not one the server accepts.
    #[error("session token not accepted")]
    Invalid,
    /// A one-time ticket was already used or has expired.
    #[error("session ticket already used or expired")]
    Spent,
}

/// Decides whether a token opens a session.
pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError>;
}

/// A fixed set of shared-secret tokens.
#[derive(Debug, Clone)]
pub struct StaticTokens {
    tokens: Vec<String>,
}

impl StaticTokens {
    pub fn new(tokens: Vec<String>) -> Self {
        Self { tokens }
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for StaticTokens {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut ok = false;
        for t in &self.tokens {
            ok |= constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        if ok {
            Ok(Grant { subject: "static-token".into(), memory_quota: None, session_id: None })
        } else {
            Err(AuthError::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_tokens() {
        let a = StaticTokens::new(vec!["s3cret".into()]);
        assert!(a.authenticate("s3cret").is_ok());
        assert_eq!(a.authenticate("s3cre"), Err(AuthError::Invalid));
        assert_eq!(a.authenticate(""), Err(AuthError::Missing));
    }
}
