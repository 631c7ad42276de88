//! Model providers behind one trait. The proxy turns an agent's provider-neutral
//! [`ModelRequest`] into a call to the configured provider, which adds its own
//! credentials; the agent never chooses a URL or sees a key.
//!
//! Providers: the Anthropic Messages API ([`anthropic`]), OpenAI-compatible chat
//! completions ([`openai`], also Ollama, vLLM, llama.cpp) and the offline
//! [`demo::DemoProvider`].

pub mod anthropic;
pub mod demo;
pub mod http;
pub mod openai;
pub mod transcribe;

use std::future::Future;

use queue_proto::proxy::{ModelRequest, ModelResponse};

/// Why a provider call failed. Retryable failures are retried by the caller with
/// backoff before the user is told the model could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider did not answer in time")]
    Timeout,
    /// No answer at all: the connection was refused, the name did not resolve, TLS
    /// failed. `cause` says which, with the address tried.
    #[error("the provider could not be reached: {cause}")]
    Unreachable { cause: String },
    #[error("the provider is overloaded or failing (status {status})")]
    Unavailable {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    #[error("the provider refused the request (status {status}{})", if at.is_empty() { String::new() } else { format!(" from {at}") })]
    Refused {
        status: u16,
        /// The address that answered (no key is ever part of it), if one did.
        at: String,
    },
    #[error("the provider's answer could not be understood")]
    BadAnswer,
}

impl ProviderError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout
                | ProviderError::Unavailable { .. }
                | ProviderError::Unreachable { .. }
        )
    }
}

/// One configured model.
pub trait Provider: Send + Sync + 'static {
    /// A short name for logs and the audit trail.
    fn name(&self) -> &'static str;
    /// One model call.
    fn complete(
        &self,
        request: &ModelRequest,
    ) -> impl Future<Output = Result<ModelResponse, ProviderError>> + Send;
}

/// The provider chosen by the configuration.
#[derive(Debug)]
pub enum AnyProvider {
    Anthropic(anthropic::Anthropic),
    OpenAi(openai::OpenAiCompatible),
    Demo(demo::DemoProvider),
}

impl Provider for AnyProvider {
    fn name(&self) -> &'static str {
        match self {
            AnyProvider::Anthropic(p) => p.name(),
            AnyProvider::OpenAi(p) => p.name(),
            AnyProvider::Demo(p) => p.name(),
        }
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse, ProviderError> {
        match self {
            AnyProvider::Anthropic(p) => p.complete(request).await,
            AnyProvider::OpenAi(p) => p.complete(request).await,
            AnyProvider::Demo(p) => p.complete(request).await,
        }
    }
}
