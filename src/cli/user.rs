//! `berth user create|list|delete`.

use clap::Subcommand;
use http::Method;
use serde_json::{json, Value};

use super::remote::seg;
use super::{print_json, text, Place};
use crate::auth::Role;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Create {
        /// Login name (lowercase letters, digits, - _ .).
        name: String,
        /// admin, viewer or image_uploader (default viewer).
        #[arg(long, conflicts_with = "admin")]
        role: Option<Role>,
        /// Shorthand for --role admin.
        #[arg(long)]
        admin: bool,
        /// Limit the role to this registry (repeat for more; default: all registries).
        #[arg(long = "registry")]
        registries: Vec<String>,
    },
    /// List users.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user and their keys (never the last admin of every registry).
    Delete {
        /// Name.
        name: String,
    },
}

pub fn run(place: &Place, cmd: UserCommand) -> Result<(), String> {
    match cmd {
        UserCommand::Create {
            name,
            role,
            admin,
            registries,
        } => {
            // Least privilege unless asked: a user is a viewer by default.
            let role = if admin {
                Role::Admin
            } else {
                role.unwrap_or(Role::Viewer)
            };
            let body = json!({"name": name, "role": role, "registries": registries});
            place.call(Method::POST, "/users", Some(body))?;
            outln!("created user {name} ({role}); give them a key with `berth key create {name}`");
        }
        UserCommand::List { json } => print(&place.list_all("/users")?, json)?,
        UserCommand::Delete { name } => {
            place.call(Method::DELETE, &format!("/users/{}", seg(&name)), None)?;
            outln!("deleted user {name} and their keys");
        }
    }
    Ok(())
}

fn print(users: &[Value], json: bool) -> Result<(), String> {
    if json {
        return print_json(&users);
    }
    outln!(
        "{:<24} {:<16} {:<30} {:<5} CREATED",
        "NAME",
        "ROLE",
        "REGISTRIES",
        "KEYS"
    );
    for u in users {
        let regs: Vec<&str> = u["registries"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let regs = if regs.is_empty() {
            "(all)".to_string()
        } else {
            regs.join(",")
        };
        outln!(
            "{:<24} {:<16} {:<30} {:<5} {}",
            text(u, "name"),
            text(u, "role"),
            regs,
            u["key_count"].to_string(),
            text(u, "created")
        );
    }
    Ok(())
}
