//! `berth user create|list|delete`.

use super::remote::seg;
use super::{print_json, Place};
use crate::api::views::{NewUser, UserDeleted, UserView};
use crate::auth::Role;
use clap::Subcommand;
use http::Method;

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
        /// The created user as JSON (the API's view; on a server without users it carries
        /// `first_key` with its secret).
        #[arg(long)]
        json: bool,
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
            json,
        } => {
            // Least privilege unless asked: a user is a viewer by default.
            let role = if admin {
                Role::Admin
            } else {
                role.unwrap_or(Role::Viewer)
            };
            let body = NewUser {
                name: name.clone(),
                role,
                registries,
            };
            let user: UserView = place.send(Method::POST, "/users", &body)?;
            if json {
                return print_json(&user);
            }
            match user
                .first_key
                .as_ref()
                .and_then(|k| Some((&k.id, k.secret.as_ref()?)))
            {
                Some((id, secret)) => {
                    outln!("created user {name} ({role}), the server's first: auth is on now");
                    outln!("Access Key ID: {id}");
                    outln!("Secret Key:    {secret}");
                    eprintln!("berth: store the secret key now: it is not shown again; use it with --access-key/--secret-key (or BERTH_ACCESS_KEY/BERTH_SECRET_KEY)");
                }
                None => outln!(
                    "created user {name} ({role}); give them a key with `berth key create {name}`"
                ),
            }
        }
        UserCommand::List { json } => print(&place.list_all("/users")?, json)?,
        UserCommand::Delete { name } => {
            let _: UserDeleted = place.call(Method::DELETE, &format!("/users/{}", seg(&name)))?;
            outln!("deleted user {name} and their keys");
        }
    }
    Ok(())
}

fn print(users: &[UserView], json: bool) -> Result<(), String> {
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
        let regs = if u.registries.is_empty() {
            "(all)".to_string()
        } else {
            u.registries.join(",")
        };
        outln!(
            "{:<24} {:<16} {:<30} {:<5} {}",
            u.name,
            u.role.to_string(),
            regs,
            u.key_count.to_string(),
            u.created
        );
    }
    Ok(())
}
