//! A listener's routes, found by the request's path in a time that does not grow with the number of routes.
//!
//! A route can take a path only if its `path_prefix` (a template's literal start) is a string prefix of the path,
//! and every such prefix ends where the path has a `/` (just after one, for a prefix ending in `/` or a template's
//! literal; just before one or at the path's end, for the others; `?` counts as `/` for the second kind, as the
//! matcher says). One exception: a template ending in `{*rest}` takes its literal start without the last `/`
//! (`/files/{*path}` takes `/files`), so such templates are also looked up by the whole path, before the rest. So
//! the candidates are found by looking the path up cut at each slash, longest first, in a map
//! from prefix to routes, and the first candidate that matches in the listener's order (most specific first) wins:
//! exactly the route a scan of every route in that order finds (a differential test holds the two to it). A
//! listener with few routes is scanned, which is faster than hashing.

use std::collections::HashMap;

use http::Method;

use crate::config::PathMatch;

/// Up to this many routes, a listener's routes are scanned in order.
const SCAN_UP_TO: usize = 8;

/// Something routed by a [`PathMatch`].
pub(crate) trait Routed {
    fn matcher(&self) -> &PathMatch;
}

/// A listener's routes, most specific first, with an index by prefix.
pub(crate) struct RouteTable<R> {
    routes: Vec<R>,
    /// Prefix → positions in `routes`, in order (empty while the routes are few enough to scan).
    by_prefix: HashMap<Box<str>, Vec<u32>>,
    /// A template's literal start without its last `/` → the positions of those templates, in order.
    by_bare_literal: HashMap<Box<str>, Vec<u32>>,
}

impl<R: Routed> RouteTable<R> {
    /// The table of `routes`, given in the listener's order.
    pub(crate) fn new(routes: Vec<R>) -> RouteTable<R> {
        let mut by_prefix: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut by_bare_literal: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        if routes.len() > SCAN_UP_TO {
            for (i, r) in routes.iter().enumerate() {
                let m = r.matcher();
                by_prefix.entry(m.path_prefix.as_str().into()).or_default().push(i as u32);
                if m.template.is_some()
                    && let Some(bare) = m.path_prefix.strip_suffix('/').filter(|b| !b.is_empty())
                {
                    by_bare_literal.entry(bare.into()).or_default().push(i as u32);
                }
            }
        }
        RouteTable { routes, by_prefix, by_bare_literal }
    }

    /// Every route, most specific first.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, R> {
        self.routes.iter()
    }

    /// The route that takes a request for `path` with `method`: the first in order that matches.
    pub(crate) fn find(&self, path: &str, method: &Method) -> Option<&R> {
        if self.by_prefix.is_empty() {
            return self.routes.iter().find(|r| r.matcher().matches(path, method));
        }
        let matching = |candidates: &Vec<u32>| {
            candidates.iter().map(|&i| &self.routes[i as usize]).find(|r| r.matcher().matches(path, method))
        };
        // Templates whose literal is the path and a `/`: the longest literal starts that can take it.
        if let Some(found) = self.by_bare_literal.get(path).and_then(matching) {
            return Some(found);
        }
        // Where a candidate prefix can end, longest first: the path's end, then after and before each separator.
        let bytes = path.as_bytes();
        let separators = (0..bytes.len()).rev().filter(|&i| bytes[i] == b'/' || bytes[i] == b'?');
        let mut previous = usize::MAX;
        std::iter::once(path.len()).chain(separators.flat_map(|i| [i + 1, i])).find_map(|cut| {
            if cut == std::mem::replace(&mut previous, cut) {
                return None;
            }
            self.by_prefix.get(&path[..cut]).and_then(matching)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_template;

    impl Routed for PathMatch {
        fn matcher(&self) -> &PathMatch {
            self
        }
    }

    /// Routes as the runtime orders them: longest literal start first, a template before a prefix of the same.
    fn ordered(mut routes: Vec<PathMatch>) -> Vec<PathMatch> {
        routes.sort_by_key(|r| std::cmp::Reverse((r.path_prefix.len(), r.template.is_some())));
        routes
    }

    fn prefix(p: &str, methods: Option<Vec<Method>>) -> PathMatch {
        PathMatch { path_prefix: p.to_owned(), template: None, methods }
    }

    fn template(t: &str) -> PathMatch {
        let literal = t.split('{').next().unwrap_or("/").to_owned();
        PathMatch { path_prefix: literal, template: Some(parse_template(t).unwrap()), methods: None }
    }

    #[test]
    fn the_index_finds_what_a_scan_in_order_finds() {
        let segments = ["a", "b", "ab", "api", "v1", "x"];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..300 {
            let mut routes = Vec::new();
            for _ in 0..rng.usize(1..40) {
                let depth = rng.usize(0..4);
                let mut p: String = (0..depth).map(|_| format!("/{}", segments[rng.usize(..segments.len())])).collect();
                match rng.u8(0..4) {
                    0 => routes.push(template(&format!("{p}/{{id}}"))),
                    1 => routes.push(template(&format!("{p}/{{*rest}}"))),
                    2 => {
                        p.push('/');
                        routes.push(prefix(&p, None));
                    }
                    _ => {
                        let methods = rng.bool().then(|| vec![Method::GET]);
                        routes.push(prefix(if p.is_empty() { "/" } else { &p }, methods));
                    }
                }
            }
            let routes = ordered(routes);
            let table = RouteTable::new(routes.clone());
            for _ in 0..200 {
                let depth = rng.usize(0..5);
                let mut path: String =
                    (0..depth).map(|_| format!("/{}", segments[rng.usize(..segments.len())])).collect();
                if path.is_empty() || rng.u8(0..6) == 0 {
                    path.push('/');
                }
                let method = if rng.bool() { Method::GET } else { Method::POST };
                let scan = routes.iter().position(|r| r.matches(&path, &method));
                let indexed =
                    table.find(&path, &method).map(|r| table.routes.iter().position(|x| std::ptr::eq(x, r)).unwrap());
                assert_eq!(indexed, scan, "round {round}: {path} {method} in {routes:#?}");
            }
        }
    }

    #[test]
    fn a_thousand_prefix_routes_are_indexed_and_each_is_found_by_its_path() {
        // 1,000 prefix routes: the index looks up the path's cuts, not the routes before the one that matches.
        let routes: Vec<PathMatch> = ordered((0..1000).map(|i| prefix(&format!("/r{i}"), None)).collect());
        let table = RouteTable::new(routes);
        assert!(!table.by_prefix.is_empty());
        for i in [0, 500, 999] {
            let path = format!("/r{i}/items/42");
            assert_eq!(table.find(&path, &Method::GET).unwrap().path_prefix, format!("/r{i}"));
        }
        assert!(table.find("/nothing", &Method::GET).is_none());
    }
}
