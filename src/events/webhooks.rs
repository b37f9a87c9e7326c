//! Webhook policies per registry and their delivery (HTTP JSON with HMAC, or Slack).
