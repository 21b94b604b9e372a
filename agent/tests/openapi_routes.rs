//! The branch API's OpenAPI document against the routes the branch server registers: every
//! route of `branch_api` is a documented path (the documented operations are checked to be
//! routed by `branch_operations.rs`), and every operation documents the typed error body.

use std::collections::BTreeSet;

/// The paths every `.route("…"` of the branch server's sources registers.
fn routes_in_sources() -> BTreeSet<String> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("branch_api.rs")];
    if let Ok(dir) = std::fs::read_dir(src.join("branch_api")) {
        files.extend(dir.map(|e| e.expect("entry").path()));
    }
    let mut found = BTreeSet::new();
    for path in files {
        let source = std::fs::read_to_string(&path).expect("source");
        for (i, _) in source.match_indices(".route(") {
            let after = source[i + ".route(".len()..].trim_start();
            let literal = after.strip_prefix('"').unwrap_or_else(|| {
                panic!("{}: a route whose path is not a literal", path.display())
            });
            found.insert(literal[..literal.find('"').expect("end of literal")].to_owned());
        }
    }
    found
}

#[test]
fn every_route_of_the_branch_api_is_documented_with_its_errors() {
    let doc = meridian_agent::openapi::document();
    let paths = doc["paths"].as_object().expect("paths");
    // Not operations of the API: the document itself, the health check, and the visit action
    // route, documented as one path per action (recall, start-serving, no-show, …).
    let not_operations = ["/api/v1/openapi.json", "/healthz", "/api/v1/visits/{id}/{action}"];
    let routes = routes_in_sources();
    assert!(routes.len() > 20, "{routes:?}");
    for route in routes {
        if !not_operations.contains(&route.as_str()) {
            assert!(paths.contains_key(&route), "{route} is routed but not documented");
        }
    }
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            for status in ["400", "401", "403", "404", "422", "429", "503"] {
                let error = &op["responses"][status]["content"]["application/json"]["schema"];
                assert_eq!(error["$ref"], "#/components/schemas/Error", "{method} {path} {status}");
            }
        }
    }
}
