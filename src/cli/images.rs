//! `berth image list|delete` and `berth tag list|set|delete`: the management API's images and
//! tags from the command line.

use super::remote::seg;
use super::{print_json, text, Place};
use crate::api::views::{ImageDeleted, ImageView, NewTag, TagSet, TagView};
use clap::Subcommand;
use http::Method;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// List the images of a registry with their tag and artifact counts.
    List {
        /// Registry.
        registry: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete an image with every artifact and tag in it.
    Delete {
        /// Registry.
        registry: String,
        /// Image name inside the registry (e.g. team/app).
        image: String,
    },
}

#[derive(Subcommand)]
pub enum TagCommand {
    /// List the tags of an image with the digest each points at.
    List {
        /// Registry.
        registry: String,
        /// Image name inside the registry.
        image: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Point a tag at an artifact of the image (creates the tag or moves it).
    Set {
        /// Registry.
        registry: String,
        /// Image name inside the registry.
        image: String,
        /// Tag.
        tag: String,
        /// Digest of an artifact already in the image.
        digest: String,
    },
    /// Delete a tag (the artifact stays).
    Delete {
        /// Registry.
        registry: String,
        /// Image name inside the registry.
        image: String,
        /// Tag.
        tag: String,
    },
}

fn image_path(registry: &str, image: &str) -> String {
    format!("/registries/{}/images/{}", seg(registry), seg(image))
}

pub fn run_image(place: &Place, cmd: ImageCommand) -> Result<(), String> {
    match cmd {
        ImageCommand::List { registry, json } => {
            let images: Vec<ImageView> =
                place.list_all(&format!("/registries/{}/images", seg(&registry)))?;
            if json {
                return print_json(&images);
            }
            outln!(
                "{:<40} {:>6} {:>9}  LAST PUSH",
                "IMAGE",
                "TAGS",
                "ARTIFACTS"
            );
            for i in &images {
                outln!(
                    "{:<40} {:>6} {:>9}  {}",
                    i.name,
                    i.tag_count,
                    i.artifact_count,
                    text(&i.last_push)
                );
            }
        }
        ImageCommand::Delete { registry, image } => {
            let d: ImageDeleted = place.call(Method::DELETE, &image_path(&registry, &image))?;
            outln!(
                "deleted image {} ({} artifacts, {} tags)",
                d.repository,
                d.deleted_artifacts,
                d.deleted_tags
            );
        }
    }
    Ok(())
}

pub fn run_tag(place: &Place, cmd: TagCommand) -> Result<(), String> {
    match cmd {
        TagCommand::List {
            registry,
            image,
            json,
        } => {
            let tags: Vec<TagView> =
                place.list_all(&format!("{}/tags", image_path(&registry, &image)))?;
            if json {
                return print_json(&tags);
            }
            for t in &tags {
                outln!("{:<30} {}", t.name, text(&t.digest));
            }
        }
        TagCommand::Set {
            registry,
            image,
            tag,
            digest,
        } => {
            let body = NewTag { tag, digest };
            let path = format!("{}/tags", image_path(&registry, &image));
            let set: TagSet = place.send(Method::POST, &path, &body)?;
            match &set.previous {
                Some(before) if before != &set.digest => {
                    outln!("moved tag {} from {before} to {}", set.name, set.digest)
                }
                Some(_) => outln!("tag {} already points at {}", set.name, set.digest),
                None => outln!("created tag {} at {}", set.name, set.digest),
            }
        }
        TagCommand::Delete {
            registry,
            image,
            tag,
        } => {
            let path = format!("{}/tags/{}", image_path(&registry, &image), seg(&tag));
            let t: TagView = place.call(Method::DELETE, &path)?;
            outln!("deleted tag {} (was {})", t.name, text(&t.digest));
        }
    }
    Ok(())
}
