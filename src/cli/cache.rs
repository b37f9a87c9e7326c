//! `berth cache create|list|update|delete|prune` (the management API), and `stats` and
//! `prefetch`, which always talk to a running server.

use std::path::PathBuf;
use std::time::Duration;

use super::remote::seg;
use super::{err, print_json, Place};
use crate::api::views::{CachePatch, ImageCacheDeleted, ImageCacheView, Prune, PruneReport};
use crate::config::{ImageCacheConfig, SourceKind};
use clap::{Args, Subcommand};
use http::Method;

#[derive(Args)]
pub struct SourceArgs {
    /// Source URL (https://hub.docker.com, https://ACCOUNT.dkr.ecr.REGION.amazonaws.com, ...).
    #[arg(long)]
    url: Option<String>,
    /// User (ECR: access key id; GCR: _json_key; Quay: account_name).
    #[arg(long)]
    username: Option<String>,
    /// Read the password/secret from standard input (keeps it out of shell history).
    #[arg(long)]
    password_stdin: bool,
    /// File with the credentials (JSON: username/password, GCR key, or Quay robot).
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Budget of one caching blob fetch (e.g. 200s).
    #[arg(long, value_parser = humantime::parse_duration)]
    fetch_budget: Option<Duration>,
    /// Serve a tag revalidated within this time without asking the source (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    revalidate_ttl: Option<Duration>,
    /// ECR region (default: from the URL).
    #[arg(long)]
    region: Option<String>,
    /// ECR API endpoint (VPC interface endpoint).
    #[arg(long)]
    ecr_endpoint: Option<String>,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Define a source registry.
    Create {
        /// Name that cache registries refer to.
        name: String,
        /// dockerhub, ecr, acr, gcr, harbor, quay or registry.
        #[arg(long)]
        kind: SourceKind,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// List image caches (credentials are never printed).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Change an image cache (a running server applies it at once).
    Update {
        /// Name.
        name: String,
        /// New kind.
        #[arg(long)]
        kind: Option<SourceKind>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Delete an image cache (refused while a registry uses it).
    Delete {
        /// Name.
        name: String,
    },
    /// Remove cached artifacts not pulled for a while and the blobs nothing references.
    Prune {
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Age since the last pull (default: pull_through.cleanup_unpulled_after).
        #[arg(long, value_parser = humantime::parse_duration)]
        unpulled_for: Option<Duration>,
        /// Keep unreferenced blobs younger than this (default: pull_through.gc_grace; `0s`
        /// removes them all, including what an upload in progress may be about to use).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Hit ratio and bytes saved since the server started (reads the /metrics of --server,
    /// default: the first listener of the config).
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Warm the cache: pull CACHEREG/PATH:TAG (all platforms, or one) through a running server
    /// (--server, default: the first listener of the config).
    Prefetch {
        /// References, e.g. docker/library/nginx:1.27.
        #[arg(required = true)]
        references: Vec<String>,
        /// Only this platform of a multi-arch image (os/arch[/variant]).
        #[arg(long)]
        platform: Option<super::prefetch::Platform>,
        /// Machine-readable output (no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Evictions under pull_through.cache_max_size, newest first.
    Evictions {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// What an eviction evicted.
    EvictionHistory {
        /// Execution id.
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(place: &Place, cmd: CacheCommand) -> Result<(), String> {
    match cmd {
        CacheCommand::Create { name, kind, source } => {
            let url = source.url.clone().ok_or("--url is required")?;
            let mut c = ImageCacheConfig::new(&name, kind, &url);
            patch(None, source)?.apply(&mut c)?;
            let _: ImageCacheView = place.send(Method::POST, "/image-caches", &c)?;
            outln!(
                "created image cache {name} ({kind}); serve it with `berth registry create NAME --type cache --cache {name}`"
            );
        }
        CacheCommand::Update { name, kind, source } => {
            let body = patch(kind, source)?;
            let path = format!("/image-caches/{}", seg(&name));
            let _: ImageCacheView = place.send(Method::PATCH, &path, &body)?;
            outln!("updated image cache {name}");
        }
        CacheCommand::List { json } => print_caches(&place.list_all("/image-caches")?, json)?,
        CacheCommand::Delete { name } => {
            let path = format!("/image-caches/{}", seg(&name));
            let _: ImageCacheDeleted = place.call(Method::DELETE, &path)?;
            outln!("deleted image cache {name}");
        }
        CacheCommand::Prune {
            dry_run,
            unpulled_for,
            grace,
            json,
        } => {
            let human = |d: Duration| humantime::format_duration(d).to_string();
            let body = Prune {
                dry_run,
                unpulled_for: unpulled_for.map(human),
                grace: grace.map(human),
            };
            let report: PruneReport = place.send(Method::POST, "/cache/prune", &body)?;
            print_prune(&report, json)?;
        }
        CacheCommand::Stats { json } => stats(place, json)?,
        CacheCommand::Prefetch {
            references,
            platform,
            json,
        } => prefetch(place, &references, platform.as_ref(), json)?,
        CacheCommand::Evictions { limit, json } => evictions(place).executions(limit, json)?,
        CacheCommand::EvictionHistory { id, json } => evictions(place).history(&id, json)?,
    }
    Ok(())
}

fn evictions(place: &Place) -> super::jobs::JobCommands<'_> {
    super::jobs::JobCommands {
        place,
        base: "/cache/eviction".into(),
        what: "cache eviction".into(),
        units: "images",
        acted: "evicted",
    }
}

pub(super) fn read_password_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).map_err(err)?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

/// The change the command line asks for (`cache create` and `cache update`).
fn patch(kind: Option<SourceKind>, a: SourceArgs) -> Result<CachePatch, String> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    Ok(CachePatch {
        kind,
        url: a.url,
        username: a.username,
        password: if a.password_stdin {
            Some(read_password_stdin()?)
        } else {
            None
        },
        credentials_file: a.credentials_file,
        fetch_budget: a.fetch_budget.map(human),
        revalidate_ttl: a.revalidate_ttl.map(human),
        region: a.region,
        ecr_endpoint: a.ecr_endpoint,
    })
}

fn print_caches(caches: &[ImageCacheView], json: bool) -> Result<(), String> {
    if json {
        return print_json(&caches);
    }
    outln!("{:<20} {:<10} {:<45} CREDENTIALS", "NAME", "KIND", "URL");
    for c in caches {
        outln!(
            "{:<20} {:<10} {:<45} {}",
            c.name,
            c.kind,
            c.url,
            c.credentials
        );
    }
    Ok(())
}

fn print_prune(report: &PruneReport, json: bool) -> Result<(), String> {
    if json {
        return print_json(report);
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for a in &report.artifacts {
        let tags = if a.tags.is_empty() {
            "no tag".to_string()
        } else {
            format!("tags {}", a.tags.join(", "))
        };
        outln!(
            "{verb} {}@{} ({tags}; last pulled {})",
            a.repository,
            a.digest,
            a.last_pull
        );
    }
    outln!(
        "{verb} {} artifacts and {} blobs ({} bytes)",
        report.artifacts.len(),
        report.blobs.len(),
        report.bytes
    );
    if report.kept_for_grace > 0 {
        outln!(
            "kept {} unreferenced blobs ({} bytes) younger than the grace period (--grace)",
            report.kept_for_grace,
            report.kept_for_grace_bytes
        );
    }
    Ok(())
}

fn stats(place: &Place, json: bool) -> Result<(), String> {
    let url = place.server_url();
    let stats = place.rt.block_on(super::stats::fetch(&url))?;
    if json {
        return print_json(&super::stats::StatsView::of(&stats));
    }
    outln!("since the server at {url} started:");
    for (name, r) in &stats.registries {
        let outcomes: Vec<String> = r.outcomes.iter().map(|(o, n)| format!("{o}={n}")).collect();
        outln!(
            "  {name:<20} {}  served {} bytes",
            outcomes.join(" "),
            r.bytes_served
        );
    }
    outln!(
        "  hit ratio {:.1}%, fetched {} bytes from sources, saved {} bytes",
        stats.hit_ratio() * 100.0,
        stats.upstream_bytes,
        stats.bytes_saved()
    );
    Ok(())
}

fn prefetch(
    place: &Place,
    references: &[String],
    platform: Option<&super::prefetch::Platform>,
    json: bool,
) -> Result<(), String> {
    let url = place.server_url();
    // A progress bar only for a person at a terminal; scripts and logs get one line per
    // reference (and --json one JSON object per reference, failures included).
    let live = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if !live {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map_err(err)?
            .progress_chars("=> "),
        )
    };
    let mut failed = 0;
    for r in references {
        bar.set_message(r.clone());
        let started = std::time::Instant::now();
        let result = place
            .rt
            .block_on(super::prefetch::prefetch(&url, r, platform, &bar));
        let line = super::prefetch::ReportLine::of(r, &result, started.elapsed().as_secs_f64());
        failed += usize::from(result.is_err());
        let text = match &result {
            Ok(rep) => format!(
                "{r} {} {} bytes {:.1}s ({} manifests, {} blobs)",
                rep.digest, rep.bytes, line.seconds, rep.manifests, rep.blobs
            ),
            Err(e) => format!("{r} failed after {:.1}s: {e}", line.seconds),
        };
        if json {
            outln!("{}", serde_json::to_string(&line).map_err(err)?);
        } else if live {
            bar.println(text);
        } else if result.is_ok() {
            outln!("{text}");
        } else {
            eprintln!("berth: {text}");
        }
    }
    bar.finish_and_clear();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} references failed",
            references.len()
        ));
    }
    Ok(())
}
