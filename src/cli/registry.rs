//! `berth registry create|list|delete`.

use super::remote::seg;
use super::{print_json, text, Place};
use crate::api::views::{NewRegistry, RegistryDeleted, RegistryView};
use crate::config::RegistryKind;
use clap::Subcommand;
use http::Method;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Create a registry.
    Create {
        /// Name: the first path segment of its images.
        name: String,
        /// normal (push and pull) or cache (pull-through).
        #[arg(long = "type", default_value = "normal")]
        kind: RegistryKind,
        /// For --type cache: the image cache it serves.
        #[arg(long)]
        cache: Option<String>,
        /// Hide it from public listeners (public_uri = false).
        #[arg(long)]
        private: bool,
        /// Let anyone pull without credentials.
        #[arg(long)]
        anonymous_pull: bool,
        /// Most bytes its images may store (a push past it is refused with 403).
        #[arg(long)]
        quota_bytes: Option<u64>,
    },
    /// List registries.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a registry, its images' records and its webhook policies.
    Delete {
        /// Name.
        name: String,
        /// Delete even if it still has repositories.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(place: &Place, cmd: RegistryCommand) -> Result<(), String> {
    match cmd {
        RegistryCommand::Create {
            name,
            kind,
            cache,
            private,
            anonymous_pull,
            quota_bytes,
        } => {
            let body = NewRegistry {
                name: name.clone(),
                kind,
                cache,
                public_uri: !private,
                anonymous_pull,
                quota_bytes,
            };
            let r: RegistryView = place.send(Method::POST, "/registries", &body)?;
            outln!("created registry {name} ({kind})");
            if let Some(note) = r.note {
                eprintln!("berth: note: {note}");
            }
        }
        RegistryCommand::List { json } => print(&place.list_all("/registries")?, json)?,
        RegistryCommand::Delete { name, force } => {
            let path = format!("/registries/{}?force={force}", seg(&name));
            let _: RegistryDeleted = place.call(Method::DELETE, &path)?;
            outln!("deleted registry {name}");
        }
    }
    Ok(())
}

fn print(regs: &[RegistryView], json: bool) -> Result<(), String> {
    if json {
        return print_json(&regs);
    }
    outln!(
        "{:<32} {:<8} {:<20} {:<8} {:<10} IMAGES",
        "NAME",
        "TYPE",
        "IMAGE CACHE",
        "PUBLIC",
        "ANON PULL"
    );
    for r in regs {
        outln!(
            "{:<32} {:<8} {:<20} {:<8} {:<10} {}",
            r.name,
            r.kind.to_string(),
            text(&r.cache),
            r.public_uri.to_string(),
            r.anonymous_pull.to_string(),
            r.image_count
        );
    }
    Ok(())
}
