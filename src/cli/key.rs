//! `berth key create|list|revoke`.

use clap::Subcommand;
use http::Method;

use super::remote::seg;
use super::{print_json, Place};
use crate::api::views::{KeyRevoked, KeyView};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an access key; its secret is printed this once.
    Create {
        /// Owner.
        user: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List a user's keys with their age; keys older than 90 days are flagged for rotation.
    List {
        /// Owner.
        user: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// Owner.
        user: String,
        /// Access Key ID.
        id: String,
    },
}

pub fn run(place: &Place, cmd: KeyCommand) -> Result<(), String> {
    match cmd {
        KeyCommand::Create { user, json } => {
            let path = format!("/users/{}/keys", seg(&user));
            let key: KeyView = place.call(Method::POST, &path)?;
            // The one answer that carries the secret: without it the key is unusable.
            let Some(secret) = &key.secret else {
                return Err(format!(
                    "the server created access key {} of {user} but sent no secret: revoke it (`berth key revoke {user} {}`)",
                    key.id, key.id
                ));
            };
            if json {
                print_json(&key)?;
            } else {
                outln!("Access Key ID: {}", key.id);
                outln!("Secret Key:    {secret}");
            }
            eprintln!(
                "berth: store the secret key now: it is not shown again (revoke the key and create another if it is lost)"
            );
        }
        KeyCommand::List { user, json } => {
            let keys: Vec<KeyView> = place.list_all(&format!("/users/{}/keys", seg(&user)))?;
            if json {
                return print_json(&keys);
            }
            outln!(
                "{:<22} {:<22} {:>8}  ROTATE",
                "ACCESS KEY ID",
                "CREATED",
                "AGE"
            );
            for k in &keys {
                let rotate = if k.rotation_due {
                    "yes: older than 90 days"
                } else {
                    "no"
                };
                outln!(
                    "{:<22} {:<22} {:>7}d  {rotate}",
                    k.id,
                    k.created,
                    k.age_days.to_string()
                );
            }
        }
        KeyCommand::Revoke { user, id } => {
            let path = format!("/users/{}/keys/{}", seg(&user), seg(&id));
            let _: KeyRevoked = place.call(Method::DELETE, &path)?;
            outln!("revoked access key {id} of {user}");
        }
    }
    Ok(())
}
