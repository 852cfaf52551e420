//! CLIP byte-level BPE tokenizer, equal to Hugging Face transformers' `CLIPTokenizer`
//! (tokenizers backend, = `CLIPTokenizerFast` of transformers 4) as the diffusers Stable
//! Diffusion pipelines call it: `tokenizer(prompt, padding="max_length", max_length=77,
//! truncation=True)`.
//!
//! Pipeline (per prompt):
//! 1. special tokens typed in the prompt (`<|startoftext|>`, `<|endoftext|>`, and `!` when the
//!    pad token is `!`) are split out of the raw text first and map straight to their ids;
//! 2. every other piece is normalised: Unicode NFC, each run of whitespace -> one space,
//!    lowercase character by character (so a capital sigma always becomes `σ`, never the final
//!    form `ς`); no ftfy, no HTML unescaping;
//! 3. it is split with the CLIP regex
//!    `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+` (whitespace is dropped);
//! 4. each word's UTF-8 bytes are mapped to the GPT-2 byte-level alphabet, `</w>` is appended
//!    to the last symbol, and BPE merges are applied lowest rank first.
//!
//! A padded row is `[BOS] + first 75 content ids + [EOS] + padding` (77 ids). SD1.x (and SDXL's
//! first tokenizer) pads with EOS 49407; SD2.x and SDXL's `tokenizer_2` pad with `!` (id 0), and
//! there `!` is a registered special token, so a `!` typed in the prompt becomes id 0 as well
//! (diffusers issue 4153).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// Beginning-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// End-of-text token (also the SD1.x pad token and the unknown token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Pad token of SD2.x and SDXL's `tokenizer_2` (id 0 in the CLIP vocabulary).
pub const EXCLAMATION_TOKEN: &str = "!";

const END_OF_WORD: &str = "</w>";
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The per-word BPE cache is cleared when it grows past this many words.
const CACHE_LIMIT: usize = 100_000;

/// Errors while loading tokenizer files. Every message names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer file {path} is not valid JSON of the expected form ({what}): {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "tokenizer merges file {path}, line {line}: malformed merge {content:?} \
         (expected two tokens separated by one space)"
    )]
    MalformedMerge { path: PathBuf, line: usize, content: String },
    #[error(
        "tokenizer merges file {path}, line {line}: merge {content:?} needs token {token:?}, \
         which is not in the vocabulary"
    )]
    MergeTokenNotInVocab { path: PathBuf, line: usize, content: String, token: String },
    #[error("tokenizer vocabulary {path} has no entry for the required token {token:?}")]
    MissingToken { path: PathBuf, token: String },
    #[error(
        "tokenizer config {path}: unsupported pad_token {token:?} \
         (supported: \"<|endoftext|>\" and \"!\")"
    )]
    UnsupportedPadToken { path: PathBuf, token: String },
    #[error("tokenizer config {path}: pad_token has an unexpected form: {value}")]
    BadPadToken { path: PathBuf, value: String },
}

/// How a 77-id row is padded after EOS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    /// Pad with `<|endoftext|>` (49407): SD1.x, SDXL `tokenizer`.
    Eos,
    /// Pad with `!` (id 0), which is then also a special token inside prompts:
    /// SD2.x, SDXL `tokenizer_2`.
    Exclamation,
}

/// CLIP BPE tokenizer. Cheap to clone (tables and the word cache are shared); `Send + Sync`.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    tables: Arc<Tables>,
    cache: Arc<WordCache>,
    pad: PadMode,
}

struct Tables {
    vocab: HashMap<String, u32>,
    /// id -> token (for ids present in the vocabulary).
    id_to_token: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// byte -> id of its byte-level character token, and of that character + `</w>`.
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    word_re: Regex,
    bos: u32,
    eos: u32,
    exclamation: u32,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("exclamation", &self.exclamation)
            .finish()
    }
}

#[derive(Default)]
struct WordCache(Mutex<HashMap<String, Vec<u32>>>);

impl WordCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u32>>> {
        // A panic while holding the lock cannot leave the map inconsistent; ignore poisoning.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for WordCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WordCache").field("words", &self.lock().len()).finish()
    }
}

/// GPT-2 / CLIP byte-level alphabet: bytes that print as themselves (33..=126, 161..=172,
/// 174..=255) keep their code point, the others get U+0100, U+0101, ... in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let cp = if printable {
            b
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(cp).expect("valid code point");
    }
    table
}

fn read_to_string(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn read_json_value(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json { path: path.to_path_buf(), what: "a JSON object", source })
}

/// The `pad_token` declared in a `tokenizer_config.json` / `special_tokens_map.json`:
/// `Ok(None)` when absent or null; a plain string or an AddedToken object `{"content": ...}`.
fn pad_token_in(path: &Path) -> Result<Option<String>, TokenizerError> {
    let value = read_json_value(path)?;
    let Some(obj) = value.as_object() else {
        return Err(TokenizerError::BadPadToken { path: path.to_path_buf(), value: "file is not a JSON object".to_string() });
    };
    match obj.get("pad_token") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::BadPadToken { path: path.to_path_buf(), value: serde_json::Value::Object(o.clone()).to_string() }),
        },
        Some(other) => Err(TokenizerError::BadPadToken { path: path.to_path_buf(), value: other.to_string() }),
    }
}

fn pad_mode_for(token: &str, path: &Path) -> Result<PadMode, TokenizerError> {
    match token {
        EOS_TOKEN => Ok(PadMode::Eos),
        EXCLAMATION_TOKEN => Ok(PadMode::Exclamation),
        other => Err(TokenizerError::UnsupportedPadToken { path: path.to_path_buf(), token: other.to_string() }),
    }
}

impl ClipTokenizer {
    /// Rows built by [`encode_padded`](Self::encode_padded) have this many ids.
    pub const MAX_LEN: usize = 77;

    /// Loads `vocab.json` + `merges.txt` from a tokenizer folder (e.g. `<model>/tokenizer` or
    /// `<model>/tokenizer_2`; a model root with a `tokenizer/` subfolder works too). The pad
    /// mode comes from the folder's `pad_token`: `special_tokens_map.json` wins over
    /// `tokenizer_config.json` (as in transformers); `<|endoftext|>` -> [`PadMode::Eos`],
    /// `!` -> [`PadMode::Exclamation`]; neither file declaring one -> `Eos`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let dir = if !dir.join("vocab.json").exists() && dir.join("tokenizer").join("vocab.json").exists() {
            dir.join("tokenizer")
        } else {
            dir.to_path_buf()
        };
        let mut pad = PadMode::Eos;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            if let Some(token) = pad_token_in(&path)? {
                pad = pad_mode_for(&token, &path)?;
                break;
            }
        }
        Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"), pad)
    }

    /// Loads a Hugging Face `vocab.json` (token -> id) and `merges.txt` (optional
    /// `#version` header line, then one `left right` pair per line, highest priority first).
    pub fn from_files(vocab_path: &Path, merges_path: &Path, pad: PadMode) -> Result<Self, TokenizerError> {
        let vocab_text = read_to_string(vocab_path)?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&vocab_text).map_err(|source| TokenizerError::Json {
            path: vocab_path.to_path_buf(),
            what: "an object of token -> id",
            source,
        })?;
        drop(vocab_text);

        let required = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| TokenizerError::MissingToken { path: vocab_path.to_path_buf(), token: token.to_string() })
        };
        let bos = required(BOS_TOKEN)?;
        let eos = required(EOS_TOKEN)?;
        let exclamation = required(EXCLAMATION_TOKEN)?;

        // Byte-level alphabet. A byte missing from the vocabulary becomes the unknown token
        // (= EOS for CLIP), as in the tokenizers BPE model; the real CLIP vocab has all 512.
        let chars = byte_to_char_table();
        let mut byte_ids = [eos; 256];
        let mut byte_end_ids = [eos; 256];
        let mut buf = String::new();
        for (b, c) in chars.iter().enumerate() {
            buf.clear();
            buf.push(*c);
            if let Some(&id) = vocab.get(buf.as_str()) {
                byte_ids[b] = id;
            }
            buf.push_str(END_OF_WORD);
            if let Some(&id) = vocab.get(buf.as_str()) {
                byte_end_ids[b] = id;
            }
        }

        let merges_text = read_to_string(merges_path)?;
        let mut merges = HashMap::with_capacity(merges_text.len() / 10);
        let mut rank = 0u32;
        let mut joined = String::new();
        for (i, raw) in merges_text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.is_empty() || (i == 0 && line.starts_with("#version")) {
                continue;
            }
            let mut parts = line.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(TokenizerError::MalformedMerge { path: merges_path.to_path_buf(), line: i + 1, content: line.to_string() });
            };
            if a.is_empty() || b.is_empty() {
                return Err(TokenizerError::MalformedMerge { path: merges_path.to_path_buf(), line: i + 1, content: line.to_string() });
            }
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let lookup = |token: &str| {
                vocab.get(token).copied().ok_or_else(|| TokenizerError::MergeTokenNotInVocab {
                    path: merges_path.to_path_buf(),
                    line: i + 1,
                    content: line.to_string(),
                    token: token.to_string(),
                })
            };
            let (ia, ib, inew) = (lookup(a)?, lookup(b)?, lookup(&joined)?);
            // A repeated pair keeps its last rank, as the tokenizers library does.
            merges.insert((ia, ib), (rank, inew));
            rank += 1;
        }

        let id_to_token = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
        let word_re = Regex::new(CLIP_PATTERN).expect("CLIP split pattern compiles");
        Ok(Self {
            tables: Arc::new(Tables { vocab, id_to_token, merges, byte_ids, byte_end_ids, word_re, bos, eos, exclamation }),
            cache: Arc::new(WordCache::default()),
            pad,
        })
    }

    /// The same tokenizer with another pad mode (tables and word cache are shared).
    pub fn with_pad_mode(mut self, pad: PadMode) -> Self {
        self.pad = pad;
        self
    }

    pub fn pad_mode(&self) -> PadMode {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.tables.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.tables.eos
    }

    pub fn pad_id(&self) -> u32 {
        match self.pad {
            PadMode::Eos => self.tables.eos,
            PadMode::Exclamation => self.tables.exclamation,
        }
    }

    /// Number of entries in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.tables.vocab.len()
    }

    /// The token string of an id (byte-level characters, `</w>` ending a word).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tables.id_to_token.get(&id).map(String::as_str)
    }

    /// Content ids of `text`, untruncated, without BOS / EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_special(rest) {
                Some((pos, len, id)) => {
                    self.encode_plain(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// 77 ids as the diffusers pipelines build them: BOS, the first 75 content ids, EOS, then
    /// the pad id.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let content = self.encode(text);
        let mut ids = Vec::with_capacity(Self::MAX_LEN);
        ids.push(self.bos_id());
        ids.extend(content.iter().take(Self::MAX_LEN - 2));
        ids.push(self.eos_id());
        ids.resize(Self::MAX_LEN, self.pad_id());
        ids
    }

    /// Number of content tokens of `text` (untruncated); more than 75 means truncation.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.encode(text).len()
    }

    /// Earliest special token in `text` (longest on a tie): (byte offset, byte length, id).
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let t = &*self.tables;
        let mut specials: [(&str, u32); 3] = [(BOS_TOKEN, t.bos), (EOS_TOKEN, t.eos), ("", 0)];
        let n = if self.pad == PadMode::Exclamation {
            specials[2] = (EXCLAMATION_TOKEN, t.exclamation);
            3
        } else {
            2
        };
        let mut best: Option<(usize, usize, u32)> = None;
        for &(s, id) in &specials[..n] {
            if let Some(pos) = text.find(s) {
                let better = match best {
                    None => true,
                    Some((bp, bl, _)) => pos < bp || (pos == bp && s.len() > bl),
                };
                if better {
                    best = Some((pos, s.len(), id));
                }
            }
        }
        best
    }

    /// Normalise, split into words and BPE-encode a piece of text free of special tokens.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = normalize(text);
        for m in self.tables.word_re.find_iter(&normalized) {
            self.encode_word(m.as_str(), out);
        }
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.cache.lock().get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_string(), ids);
    }

    /// Byte-level BPE of one word: repeatedly merge the lowest-ranked adjacent pair (all its
    /// non-overlapping occurrences, left to right) until no pair has a merge.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let t = &*self.tables;
        let bytes = word.as_bytes();
        let mut syms: Vec<u32> = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            syms.push(if i + 1 == bytes.len() { t.byte_end_ids[b as usize] } else { t.byte_ids[b as usize] });
        }
        while syms.len() > 1 {
            let mut best: Option<(u32, u32, u32, u32)> = None; // (rank, left, right, merged)
            for w in syms.windows(2) {
                if let Some(&(rank, merged)) = t.merges.get(&(w[0], w[1]))
                    && best.is_none_or(|(r, ..)| rank < r)
                {
                    best = Some((rank, w[0], w[1], merged));
                }
            }
            let Some((_, left, right, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == left && syms[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(syms[i]);
                    i += 1;
                }
            }
            syms = next;
        }
        syms
    }
}

/// NFC, each run of whitespace -> one space, lowercase character by character
/// (`char::to_lowercase`, no context-dependent final sigma).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
                in_space = true;
            }
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real CLIP tokenizer shipped with the crate.
    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("clip-tokenizer")
    }

    fn clip() -> ClipTokenizer {
        ClipTokenizer::from_dir(&fixture_dir()).expect("load fixture tokenizer")
    }

    /// A fresh scratch folder under the system temp dir.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stylealign-tok-{}-{}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const TINY_VOCAB: &str = r#"{"!": 0, "a": 1, "b": 2, "a</w>": 3, "b</w>": 4, "ab": 5, "ab</w>": 6,
        "<|startoftext|>": 7, "<|endoftext|>": 8}"#;

    #[test]
    fn send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<ClipTokenizer>();
    }

    #[test]
    fn fixture_basics() {
        let tok = clip();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
        assert_eq!(tok.pad_mode(), PadMode::Eos);
        let tok2 = tok.clone().with_pad_mode(PadMode::Exclamation);
        assert_eq!((tok2.pad_mode(), tok2.pad_id()), (PadMode::Exclamation, 0));
        assert_eq!(tok.id_to_token(256), Some("!</w>"));
        assert_eq!(tok.id_to_token(49407), Some(EOS_TOKEN));
    }

    #[test]
    fn empty_prompt() {
        let tok = clip();
        for text in ["", " ", " \t\n "] {
            assert!(tok.encode(text).is_empty());
            assert_eq!(tok.count_tokens(text), 0);
            let ids = tok.encode_padded(text);
            assert_eq!(ids.len(), ClipTokenizer::MAX_LEN);
            assert_eq!(ids[0], 49406);
            assert!(ids[1..].iter().all(|&x| x == 49407), "{ids:?}");
            let ids0 = tok.clone().with_pad_mode(PadMode::Exclamation).encode_padded(text);
            assert_eq!(&ids0[..2], &[49406, 49407]);
            assert!(ids0[2..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn long_prompt_truncated() {
        let tok = clip();
        let text = vec!["cat"; 100].join(" ");
        let content = tok.encode(&text);
        assert_eq!(content.len(), 100);
        assert_eq!(tok.count_tokens(&text), 100);
        for t in [tok.clone(), tok.clone().with_pad_mode(PadMode::Exclamation)] {
            let ids = t.encode_padded(&text);
            assert_eq!(ids.len(), 77);
            assert_eq!(ids[0], 49406);
            assert_eq!(&ids[1..76], &content[..75]);
            assert_eq!(ids[76], 49407);
        }
        // exactly 75 content tokens: no padding at all
        let text = vec!["a"; 75].join(" ");
        let ids = tok.encode_padded(&text);
        assert_eq!(ids[76], 49407);
        assert!(ids[1..76].iter().all(|&x| x == 320));
    }

    #[test]
    fn special_tokens_and_case() {
        let tok = clip();
        let ids = tok.encode("a<|endoftext|>b<|startoftext|>");
        assert_eq!(ids, vec![320, 49407, 321, 49406]);
        // not special when written in another case: goes through BPE as text
        assert!(!tok.encode("<|ENDOFTEXT|>").contains(&49407));
        // '!' is a special token only in Exclamation mode
        assert_eq!(tok.encode("hi!").last(), Some(&256));
        let ex = tok.clone().with_pad_mode(PadMode::Exclamation);
        assert_eq!(ex.encode("! !! !!!"), vec![0; 6]);
        assert_eq!(tok.encode("! !! !!!"), vec![256, 748, 995]);
        // per-character lowercase: capital sigma -> σ everywhere
        assert_eq!(tok.encode("ΟΔΟΣ"), tok.encode("οδοσ"));
        assert_eq!(tok.encode("Hello   WORLD"), tok.encode("hello world"));
    }

    #[test]
    fn tiny_vocab_merges() {
        let dir = scratch("tiny");
        std::fs::write(dir.join("vocab.json"), TINY_VOCAB).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\na b</w>\n").unwrap();
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("ab ba abab AB"), vec![6, 2, 3, 5, 6, 6]);
        assert_eq!(tok.encode_padded("a")[..4], [7, 3, 8, 8]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_vocab_names_path() {
        let dir = scratch("missing");
        let vocab = dir.join("vocab.json");
        let err = ClipTokenizer::from_files(&vocab, &dir.join("merges.txt"), PadMode::Eos).unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&vocab.display().to_string()), "{err}");
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_merges_line() {
        let dir = scratch("badmerges");
        std::fs::write(dir.join("vocab.json"), TINY_VOCAB).unwrap();
        let merges = dir.join("merges.txt");
        for bad in ["a b c", "ab", "a  b"] {
            std::fs::write(&merges, format!("#version: 0.2\na b\n{bad}\n")).unwrap();
            let err = ClipTokenizer::from_files(&dir.join("vocab.json"), &merges, PadMode::Eos).unwrap_err();
            assert!(matches!(err, TokenizerError::MalformedMerge { line: 3, .. }), "{bad:?}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&merges.display().to_string()) && msg.contains("line 3"), "{msg}");
        }
        std::fs::write(&merges, "#version: 0.2\na x\n").unwrap();
        let err = ClipTokenizer::from_files(&dir.join("vocab.json"), &merges, PadMode::Eos).unwrap_err();
        assert!(matches!(err, TokenizerError::MergeTokenNotInVocab { line: 2, .. }), "{err:?}");
        std::fs::write(dir.join("vocab.json"), "[1, 2]").unwrap();
        let err = ClipTokenizer::from_files(&dir.join("vocab.json"), &merges, PadMode::Eos).unwrap_err();
        assert!(matches!(err, TokenizerError::Json { .. }) && err.to_string().contains("vocab.json"), "{err}");
        std::fs::write(dir.join("vocab.json"), r#"{"a": 1}"#).unwrap();
        let err = ClipTokenizer::from_files(&dir.join("vocab.json"), &merges, PadMode::Eos).unwrap_err();
        assert!(matches!(err, TokenizerError::MissingToken { .. }), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pad_mode_from_config() {
        let dir = scratch("padcfg");
        std::fs::write(dir.join("vocab.json"), TINY_VOCAB).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
        // no config files: EOS
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_mode(), PadMode::Eos);
        // plain string in tokenizer_config.json
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"pad_token": "!"}"#).unwrap();
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!((tok.pad_mode(), tok.pad_id()), (PadMode::Exclamation, 0));
        // AddedToken object in special_tokens_map.json wins
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true}}"#,
        )
        .unwrap();
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_mode(), PadMode::Eos);
        std::fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": {"content": "!"}}"#).unwrap();
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_mode(), PadMode::Exclamation);
        // explicit override
        let tok = ClipTokenizer::from_dir(&dir).unwrap().with_pad_mode(PadMode::Eos);
        assert_eq!((tok.pad_mode(), tok.pad_id()), (PadMode::Eos, 8));
        // unsupported pad token
        std::fs::write(dir.join("special_tokens_map.json"), r#"{"pad_token": "<pad>"}"#).unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, TokenizerError::UnsupportedPadToken { .. }), "{err:?}");
        assert!(err.to_string().contains("special_tokens_map.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fixture_pad_mode_and_model_root() {
        // a folder holding `tokenizer/` (a model root) is accepted too
        let root = scratch("model-root");
        std::fs::create_dir_all(root.join("tokenizer")).unwrap();
        for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
            std::fs::copy(fixture_dir().join(f), root.join("tokenizer").join(f)).unwrap();
        }
        let tok = ClipTokenizer::from_dir(&root).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!((tok.pad_mode(), tok.vocab_size()), (PadMode::Eos, 49408));
    }
}
