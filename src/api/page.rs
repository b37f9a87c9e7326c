//! List pagination: `page` (from 1) and `page_size` (default 50, at most 500), the
//! `{"items","total","page","page_size"}` envelope and the `Link: rel="next"` header.

use http::{header, Response, StatusCode};

use super::views::Paged;
use super::Ctx;
use crate::error::{Error, Result};
use crate::http::body::Body;
use crate::http::req::set;

/// Page size when the client gives none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size honoured.
pub const MAX_PAGE_SIZE: usize = 500;

/// The page a list request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// 1-based page number.
    pub page: usize,
    /// Items per page.
    pub size: usize,
}

impl Page {
    /// Reads `page` and `page_size`; zero, negative or non-numeric values are a 400, a size
    /// above the maximum is clamped (as `/v2/` lists clamp `n`).
    pub fn of(ctx: &Ctx<'_>) -> Result<Page> {
        let num = |name: &str, default: usize| -> Result<usize> {
            match ctx.query(name) {
                None => Ok(default),
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(Error::PaginationInvalid(format!(
                        "{name}={v:?} is not a positive integer"
                    ))),
                },
            }
        };
        Ok(Page {
            page: num("page", 1)?,
            size: num("page_size", DEFAULT_PAGE_SIZE)?.min(MAX_PAGE_SIZE),
        })
    }

    /// The slice of `total` items this page covers (empty past the end).
    pub fn window(&self, total: usize) -> std::ops::Range<usize> {
        let start = (self.page - 1).saturating_mul(self.size).min(total);
        start..start.saturating_add(self.size).min(total)
    }

    /// Selects this page of `items`, turns each into its view with `show`, and answers with the
    /// envelope (plus `Link` when more pages follow). `show` runs only for the page's items,
    /// so expensive details are computed for at most one page.
    pub fn respond<T, V: serde::Serialize>(
        &self,
        ctx: &Ctx<'_>,
        items: Vec<T>,
        show: impl FnMut(T) -> Result<V>,
    ) -> Result<Response<Body>> {
        let total = items.len();
        let window = self.window(total);
        let shown = items
            .into_iter()
            .skip(window.start)
            .take(window.len())
            .map(show)
            .collect::<Result<Vec<_>>>()?;
        self.envelope(ctx, total, shown)
    }

    /// The count of `items` and this page of them (to render with async work, then answer
    /// with [`Page::envelope`]).
    pub fn slice<T>(&self, items: Vec<T>) -> (usize, Vec<T>) {
        let total = items.len();
        let window = self.window(total);
        let page = items
            .into_iter()
            .skip(window.start)
            .take(window.len())
            .collect();
        (total, page)
    }

    /// The envelope of this page's already-rendered items out of `total`.
    pub fn envelope<V: serde::Serialize>(
        &self,
        ctx: &Ctx<'_>,
        total: usize,
        shown: Vec<V>,
    ) -> Result<Response<Body>> {
        let end = self.window(total).end;
        let mut r = super::json(
            StatusCode::OK,
            &Paged {
                items: shown,
                page: self.page,
                page_size: self.size,
                total,
            },
        )?;
        if end < total {
            set(&mut r, header::LINK, &self.next_link(ctx));
        }
        Ok(r)
    }

    /// `<path?...&page=N+1&page_size=S>; rel="next"`, keeping the request's other parameters
    /// (filters) as they were sent.
    fn next_link(&self, ctx: &Ctx<'_>) -> String {
        let mut query: Vec<String> = ctx
            .req
            .query
            .unwrap_or("")
            .split('&')
            .filter(|pair| {
                let key = pair.split('=').next().unwrap_or("");
                !pair.is_empty() && key != "page" && key != "page_size"
            })
            .map(str::to_string)
            .collect();
        query.push(format!("page={}", self.page + 1));
        query.push(format!("page_size={}", self.size));
        format!("<{}?{}>; rel=\"next\"", ctx.path, query.join("&"))
    }
}

/// Whether `name` contains the `q` filter of a request (case-insensitive; no `q` matches all).
pub fn matches_q(q: &Option<String>, name: &str) -> bool {
    q.as_deref()
        .is_none_or(|q| name.to_ascii_lowercase().contains(&q.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_pages_and_stop_at_the_end() {
        let p = |page, size| Page { page, size };
        assert_eq!(p(1, 2).window(5), 0..2);
        assert_eq!(p(3, 2).window(5), 4..5);
        assert_eq!(p(4, 2).window(5), 5..5);
        assert_eq!(p(usize::MAX, 500).window(5), 5..5);
    }
}
