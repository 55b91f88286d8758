//! The module structure ARCHITECTURE.md promises: the top-level modules of
//! `src/` depend on each other one way only (no import circle, direct or
//! around several modules), and the modules named as leaves import no other
//! module of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that must not depend on any other module of the crate: every
/// layer may use them because they use none.
const LEAVES: [&str; 3] = ["wire", "ids", "metrics"];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read src") {
            rust_files(&e.expect("entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// Every top-level module and the top-level modules its code names through
/// `crate::` (in `use` lists too); comments do not count.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for e in std::fs::read_dir(&src).expect("read src") {
        let p = e.expect("entry").path();
        let name = p.file_stem().expect("name").to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&p, &mut files);
        modules.insert(name, files);
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut g = BTreeMap::new();
    for (m, files) in &modules {
        let mut deps = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(f).expect("read file");
            for line in text.lines().map(str::trim_start).filter(|l| !l.starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let words: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                        let group = group.split('}').next().unwrap_or("");
                        group
                            .split(',')
                            .map(|w| w.trim().split("::").next().unwrap_or(""))
                            .collect()
                    } else {
                        vec![rest
                            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .next()
                            .unwrap_or("")]
                    };
                    for w in words {
                        if w != m && names.contains(w) {
                            deps.insert(w.to_string());
                        }
                    }
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// A circle through `start`, if there is one.
fn circle(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_depend_one_way_only() {
    let g = graph();
    assert!(g.len() > 10, "the module graph was read: {g:?}");
    let circles: Vec<String> = g
        .keys()
        .filter_map(|m| circle(&g, m))
        .map(|c| format!("{} -> {}", c.join(" -> "), c[0]))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles among src/ modules:\n{}",
        circles.join("\n")
    );
}

#[test]
fn leaf_modules_import_nothing_of_the_crate() {
    let g = graph();
    for leaf in LEAVES {
        let deps = g.get(leaf).unwrap_or_else(|| panic!("src/{leaf} exists"));
        assert!(deps.is_empty(), "{leaf} is a leaf but uses {deps:?}");
    }
}

#[test]
fn the_check_finds_a_circle_when_there_is_one() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circle(&g, "a"), Some(vec!["a".into(), "b".into(), "c".into()]));
    g.get_mut("c").unwrap().clear();
    assert_eq!(circle(&g, "a"), None);
}
