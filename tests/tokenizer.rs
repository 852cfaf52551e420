//! CLIP tokenizer against the transformers golden (`tokenizer_golden.json`, 63 prompts).
//!
//! The golden folder is `$STYLEALIGN_GOLDENS` if set (with `tokenizer_golden.json` and
//! `tokenizer/` inside it), else `tests/fixtures/goldens`.

use std::path::PathBuf;

use stylealign::model::tokenizer::{ClipTokenizer, PadMode};

fn golden_dir() -> PathBuf {
    match std::env::var_os("STYLEALIGN_GOLDENS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("goldens"),
    }
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key].as_array().unwrap_or_else(|| panic!("golden row has no array {key:?}")).iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn tokenizer_matches_golden() {
    let dir = golden_dir();
    let golden_path = dir.join("tokenizer_golden.json");
    let text = std::fs::read_to_string(&golden_path).unwrap_or_else(|e| panic!("cannot read {}: {e}", golden_path.display()));
    let golden: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    let rows = golden["prompts"].as_array().expect("prompts array");
    assert!(!rows.is_empty(), "no prompts in {}", golden_path.display());

    let t0 = std::time::Instant::now();
    let eos = ClipTokenizer::from_dir(&dir.join("tokenizer")).expect("load tokenizer");
    let load = t0.elapsed();
    assert_eq!(eos.pad_mode(), PadMode::Eos, "fixture config pads with <|endoftext|>");
    assert_eq!((eos.bos_id(), eos.eos_id(), eos.pad_id()), (49406, 49407, 49407));
    let pad0 = eos.clone().with_pad_mode(PadMode::Exclamation);
    assert_eq!(pad0.pad_id(), 0);

    let mut bad = Vec::new();
    let mut tokens_checked = 0;
    for row in rows {
        let prompt = row["prompt"].as_str().expect("prompt");
        let idx = row["index"].as_u64().unwrap_or(0);
        let mut what = Vec::new();
        let content = eos.encode(prompt);
        if content != ids(row, "content_ids") {
            what.push(format!("content_ids: got {content:?}, want {:?}", ids(row, "content_ids")));
        }
        if let Some(n) = row["num_content_tokens"].as_u64()
            && eos.count_tokens(prompt) != n as usize
        {
            what.push(format!("count_tokens {} != {n}", eos.count_tokens(prompt)));
        }
        if let Some(toks) = row["tokens"].as_array() {
            let got: Vec<&str> = content.iter().map(|&i| eos.id_to_token(i).unwrap_or("?")).collect();
            let want: Vec<&str> = toks.iter().map(|t| t.as_str().unwrap_or("")).collect();
            if got != want {
                what.push(format!("tokens: got {got:?}, want {want:?}"));
            }
            tokens_checked += 1;
        }
        let got = eos.encode_padded(prompt);
        if got != ids(row, "input_ids") {
            what.push(format!("input_ids: got {got:?}, want {:?}", ids(row, "input_ids")));
        }
        let got = pad0.encode_padded(prompt);
        if got != ids(row, "input_ids_pad0") {
            what.push(format!("input_ids_pad0: got {got:?}, want {:?}", ids(row, "input_ids_pad0")));
        }
        if !what.is_empty() {
            bad.push(format!("prompt {idx} {prompt:?}:\n    {}", what.join("\n    ")));
        }
    }
    let matched = rows.len() - bad.len();
    println!(
        "tokenizer: {matched} prompts matched of {} (content_ids, input_ids, input_ids_pad0; tokens on {tokens_checked}); vocab loaded in {load:?}",
        rows.len()
    );
    assert!(bad.is_empty(), "tokenizer: {} of {} prompts differ:\n{}", bad.len(), rows.len(), bad.join("\n"));
}
