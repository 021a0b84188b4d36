//! A bound on how deeply a YAML snapshot nests, checked before it is parsed for real.
//!
//! libyaml's scanner visits every open flow collection on each token it reads, so a
//! document of `[[[[…` costs time quadratic in its depth: 4 s at 40,000 levels, about a
//! minute at 100,000, from a file of 200 KB (and a push may be far larger). serde_yaml
//! gathers a whole document's events before its recursion limit applies, so that limit
//! comes too late. This pass reads the events of the same parser serde_yaml runs and stops
//! at the first collection opened deeper than the bound, so no document costs more than
//! the bound's depth of work per token.
//!
//! The one `unsafe` module of the library (but for a `geteuid` call in `keys::spool`):
//! libyaml is driven through `unsafe-libyaml`, the translation serde_yaml itself uses,
//! because a second parser could disagree with it about where collections open, and a
//! disagreement would let a deep document through.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use unsafe_libyaml as unsafe_sys;

/// Deeper than any snapshot needs (a key's fields nest four levels down), and far short of
/// depths that cost anything.
pub const MAX_DEPTH: usize = 64;

/// What the pass refuses, and where (1-based, as editors count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The first collection past the bound opens here.
    TooDeep { line: u64, column: u64 },
    /// An alias (`*name`): serde_yaml replays the anchored node at each one, so a list of
    /// 50,000 scopes anchored once and named by 3,000 keys is an 850 KB push that builds
    /// 150 million strings (minutes of CPU, the push turn held). No snapshot needs one.
    Alias { line: u64, column: u64 },
    /// A tag (`!x`, `!!str`) or a `%TAG` directive: libyaml copies a tag's whole text into
    /// each node that names it and serde_yaml holds every node, so `%TAG !x! <15 KB>` and
    /// 90,000 `!x!a` made a 645 KB push take 1.7 GB. No snapshot needs one.
    Tag { line: u64, column: u64 },
    /// More nodes than [`max_events`] allows for the document's size: serde_yaml holds every
    /// parser event of a document (about 100 bytes each) before it reads a field, so a list
    /// of 2-byte scalars costs 50 times its size (a 62 MB push took 3.3 GB, and was refused
    /// only after). A snapshot averages 10 bytes or more a node.
    TooMany { bound: usize },
}

/// The most parser events (nodes, collection ends) a YAML snapshot of `len` bytes may
/// hold: one per 6 bytes on average, beyond a first 100,000.
pub fn max_events(len: usize) -> usize {
    100_000 + len / 6
}

/// Below this size no document can exceed [`max_events`] (an event takes a byte at least),
/// so the pass is not needed for it.
const COUNTED_ABOVE: usize = 100_000;

impl Refused {
    /// Where it is (1-based line and column), when it is somewhere.
    pub fn line_column(&self) -> Option<(u64, u64)> {
        match *self {
            Refused::TooDeep { line, column }
            | Refused::Alias { line, column }
            | Refused::Tag { line, column } => Some((line, column)),
            Refused::TooMany { .. } => None,
        }
    }

    /// Why, for a document called `document` (`a snapshot`, `the config`): the one wording
    /// of these refusals wherever YAML is read.
    pub fn reason(&self, document: &str) -> String {
        match self {
            Refused::TooDeep { .. } => format!("nested more than {MAX_DEPTH} levels deep"),
            Refused::Alias { .. } => {
                format!("aliases (`*name`) are not accepted in {document}")
            }
            Refused::Tag { .. } => {
                format!("tags (`!name`, `%TAG`) are not accepted in {document}")
            }
            Refused::TooMany { bound } => format!(
                "more than {bound} YAML nodes for its size (one per 6 bytes beyond 100,000); write large snapshots as JSON"
            ),
        }
    }
}

/// What a pass refuses, and the dotted path (`limits.max_header_bytes`, `a[2]`) of the node
/// it refused (empty for the document itself or a `%TAG` directive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub refused: Refused,
    pub path: String,
}

/// Which documents a pass is for: a key snapshot (a push may be large, and no snapshot needs
/// an alias) or the config (a page an operator wrote, read once at start and by `check`).
#[derive(Debug, Clone, Copy)]
struct Rules {
    max_depth: usize,
    /// Refuse the first alias.
    refuse_aliases: bool,
    /// Refuse more events than [`max_events`] allows.
    count_events: bool,
    /// Run the pass whatever the bytes look like (else only when they may need it).
    always: bool,
}

/// `Err` when a collection in `text` opens more than `limit` levels deep, or at the first
/// alias or tag. A syntax error ends the pass without one: the real parse, which reads the
/// same events, reports it. The snapshot's pass.
pub fn check(text: &[u8], limit: usize) -> Result<(), Refused> {
    let rules = Rules {
        max_depth: limit,
        refuse_aliases: true,
        count_events: true,
        always: false,
    };
    scan(text, rules).map_err(|r| r.refused)
}

/// The config's pass: nesting deeper than [`MAX_DEPTH`] (serde_yaml reads `[[[[…` in time
/// quadratic in its depth, as it does a snapshot's) and tags (serde_yaml ignores a tag it
/// does not know, and reads `!!binary` as the text it decodes from) are refused, naming the
/// path. Aliases are left to serde_yaml, whose repetition limit bounds them; a config is
/// at most 4 MiB, so the event count is not bounded. Always run: block nesting costs
/// nothing to parse, but a config that deep is a mistake all the same.
pub fn check_config(text: &[u8]) -> Result<(), Refusal> {
    scan(
        text,
        Rules {
            max_depth: MAX_DEPTH,
            refuse_aliases: false,
            count_events: false,
            always: true,
        },
    )
}

/// Where the pass is inside a collection, to name the path of a refused node.
enum Frame {
    /// A mapping: its current key (cut to [`PATH_KEY_MAX`] bytes) and whether the next
    /// node is a key.
    Map { key: String, at_key: bool },
    /// A sequence: the index of its next item.
    Seq { index: usize },
}

/// Longest key kept for a path: a path names where to look, and the line says it too.
const PATH_KEY_MAX: usize = 64;

/// Longest path shown (about): a path 64 levels deep (`a[0][0]…`) says no more than its start.
const PATH_MAX: usize = 48;

/// The dotted path to the node the pass is at (a key names its mapping).
fn path(stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack {
        if out.len() > PATH_MAX {
            out.push('…');
            break;
        }
        match frame {
            Frame::Map { at_key: true, .. } => {}
            Frame::Map { key, .. } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Frame::Seq { index } => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// A node (scalar, alias or a collection now closed) is done: its parent moves on.
fn advance(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { at_key, .. }) => *at_key = !*at_key,
        Some(Frame::Seq { index }) => *index += 1,
        None => {}
    }
}

fn scan(text: &[u8], rules: Rules) -> Result<(), Refusal> {
    let limit = rules.max_depth;
    // Only flow collections cost: each opens at a `[` or `{`, so with no more of those than
    // the bound none can nest deeper, and the pass is not needed (block-style snapshots
    // skip it this way; block nesting costs libyaml nothing extra, and serde_yaml's own
    // recursion limit refuses it). An alias names an anchor, which needs a `&`.
    let mut flow_opens = text.iter().filter(|b| matches!(b, b'[' | b'{'));
    // A tag starts with `!` (a `%TAG` directive names one).
    let marked = text.iter().any(|b| matches!(b, b'&' | b'!'));
    if !rules.always && text.len() <= COUNTED_ABOVE && flow_opens.nth(limit).is_none() && !marked {
        return Ok(());
    }
    let bound = max_events(text.len());
    let mut events = 0usize;
    let Some(mut parser) = Parser::new(text) else {
        // libyaml could not allocate its buffers; the real parse will fail the same way.
        return Ok(());
    };
    let mut stack: Vec<Frame> = Vec::new();
    let refuse = |refused, stack: &[Frame]| Refusal {
        refused,
        path: path(stack),
    };
    let at = |line: u64, column: u64| (line.saturating_add(1), column.saturating_add(1));
    loop {
        // A mapping's key is read into its frame, so a path can name it.
        let key = match stack.last_mut() {
            Some(Frame::Map { key, at_key: true }) => Some(key),
            _ => None,
        };
        let Some(event) = parser.next(key) else {
            break;
        };
        events += 1;
        if rules.count_events && events > bound {
            return Err(refuse(Refused::TooMany { bound }, &[]));
        }
        match event {
            Event::Open { line, column, map } => {
                if stack.len() + 1 > limit {
                    let (line, column) = at(line, column);
                    return Err(refuse(Refused::TooDeep { line, column }, &stack));
                }
                if let Some(Frame::Map { key, at_key: true }) = stack.last_mut() {
                    // A collection as a key: no name to give.
                    key.clear();
                    key.push('?');
                }
                stack.push(if map {
                    Frame::Map {
                        key: String::new(),
                        at_key: true,
                    }
                } else {
                    Frame::Seq { index: 0 }
                });
            }
            Event::Scalar => advance(&mut stack),
            Event::Alias { line, column } => {
                if rules.refuse_aliases {
                    let (line, column) = at(line, column);
                    return Err(refuse(Refused::Alias { line, column }, &stack));
                }
                if let Some(Frame::Map { key, at_key: true }) = stack.last_mut() {
                    key.clear();
                    key.push('*');
                }
                advance(&mut stack);
            }
            Event::Tag { line, column } => {
                let (line, column) = at(line, column);
                return Err(refuse(Refused::Tag { line, column }, &stack));
            }
            Event::Close => {
                stack.pop();
                advance(&mut stack);
            }
            Event::Other => {}
            Event::End => break,
        }
    }
    Ok(())
}

enum Event {
    Open { line: u64, column: u64, map: bool },
    Scalar,
    Alias { line: u64, column: u64 },
    Tag { line: u64, column: u64 },
    Close,
    Other,
    End,
}

/// A libyaml parser reading `input`. It lives on the heap, reached only through the one
/// raw pointer made when it was allocated, because libyaml keeps a pointer to the parser
/// inside the parser (its read handler's data): it must never move, and no reference to it
/// may be made that would outdate that pointer.
struct Parser<'input> {
    parser: *mut unsafe_sys::yaml_parser_t,
    _input: std::marker::PhantomData<&'input [u8]>,
}

impl<'input> Parser<'input> {
    fn new(input: &'input [u8]) -> Option<Self> {
        let slot = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        let parser = Box::into_raw(slot).cast::<unsafe_sys::yaml_parser_t>();
        // SAFETY: `parser` points to an allocation of the right size and alignment that
        // nothing else reaches; initialize zeroes and sets up every field before anything
        // reads one. On failure libyaml has freed what it allocated, and so is the slot.
        unsafe {
            if unsafe_sys::yaml_parser_initialize(parser).fail {
                drop(Box::from_raw(
                    parser.cast::<MaybeUninit<unsafe_sys::yaml_parser_t>>(),
                ));
                return None;
            }
            unsafe_sys::yaml_parser_set_encoding(parser, unsafe_sys::YAML_UTF8_ENCODING);
            // The input outlives the parser (`'input`); libyaml only reads it.
            unsafe_sys::yaml_parser_set_input_string(parser, input.as_ptr(), input.len() as u64);
        }
        Some(Parser {
            parser,
            _input: std::marker::PhantomData,
        })
    }

    /// The next event, or `None` at a syntax error (libyaml's error state is sticky). A
    /// scalar's text is written to `key` when there is one (cut to [`PATH_KEY_MAX`] bytes).
    fn next(&mut self, key: Option<&mut String>) -> Option<Event> {
        let p = self.parser;
        let mut event = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        let e = event.as_mut_ptr();
        // SAFETY: the parser was initialized in `new`; `e` points to memory the call fills
        // whole before returning success, and the event is deleted (its owned strings freed)
        // once its type and mark are read.
        unsafe {
            // unsafe-libyaml shows the error field only through `Deref`; the shared
            // reference lives for this read alone, and is made from `p`.
            let error = (&*p).error;
            if error != unsafe_sys::YAML_NO_ERROR || unsafe_sys::yaml_parser_parse(p, e).fail {
                return None;
            }
            let mark = || ((*e).start_mark.line, (*e).start_mark.column);
            // SAFETY (the union reads): each field read is the one libyaml fills for the
            // event's type, checked first.
            let tagged = match (*e).type_ {
                unsafe_sys::YAML_SCALAR_EVENT => !(*e).data.scalar.tag.is_null(),
                unsafe_sys::YAML_SEQUENCE_START_EVENT => !(*e).data.sequence_start.tag.is_null(),
                unsafe_sys::YAML_MAPPING_START_EVENT => !(*e).data.mapping_start.tag.is_null(),
                unsafe_sys::YAML_DOCUMENT_START_EVENT => {
                    let d = (*e).data.document_start.tag_directives;
                    d.start != d.end
                }
                _ => false,
            };
            let kind = match (*e).type_ {
                _ if tagged => {
                    let (line, column) = mark();
                    Event::Tag { line, column }
                }
                unsafe_sys::YAML_SEQUENCE_START_EVENT | unsafe_sys::YAML_MAPPING_START_EVENT => {
                    let (line, column) = mark();
                    let map = (*e).type_ == unsafe_sys::YAML_MAPPING_START_EVENT;
                    Event::Open { line, column, map }
                }
                unsafe_sys::YAML_SCALAR_EVENT => {
                    if let Some(key) = key {
                        key.clear();
                        let scalar = &(*e).data.scalar;
                        let len = (scalar.length as usize).min(PATH_KEY_MAX);
                        if len > 0 && !scalar.value.is_null() {
                            // libyaml's own buffer of `length` bytes, read before the event
                            // (and it) is deleted below.
                            let bytes = std::slice::from_raw_parts(scalar.value, len);
                            key.push_str(&String::from_utf8_lossy(bytes));
                        }
                    }
                    Event::Scalar
                }
                unsafe_sys::YAML_SEQUENCE_END_EVENT | unsafe_sys::YAML_MAPPING_END_EVENT => {
                    Event::Close
                }
                unsafe_sys::YAML_ALIAS_EVENT => {
                    let (line, column) = mark();
                    Event::Alias { line, column }
                }
                // No event: libyaml has nothing more to give (never after a success).
                unsafe_sys::YAML_STREAM_END_EVENT | unsafe_sys::YAML_NO_EVENT => Event::End,
                _ => Event::Other,
            };
            unsafe_sys::yaml_event_delete(e);
            Some(kind)
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: only parsers `new` initialized are built; each is deleted, and its slot
        // freed, once, here.
        unsafe {
            unsafe_sys::yaml_parser_delete(self.parser);
            drop(Box::from_raw(
                self.parser.cast::<MaybeUninit<unsafe_sys::yaml_parser_t>>(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(open: &str, close: &str, depth: usize) -> String {
        format!("keys: {}{}\n", open.repeat(depth), close.repeat(depth))
    }

    #[test]
    fn a_flow_document_deeper_than_the_bound_is_refused_where_it_crosses() {
        let text = nested("[", "]", 100);
        // `keys:` opens the document's mapping (level 1), so level 65 is the 64th '['.
        assert_eq!(
            check(text.as_bytes(), 64),
            Err(Refused::TooDeep {
                line: 1,
                column: 6 + 64
            })
        );
        assert!(check(nested("{a: ", "}", 100).as_bytes(), 64).is_err());
    }

    #[test]
    fn documents_within_the_bound_pass_block_and_flow_alike() {
        assert_eq!(check(nested("[", "]", 63).as_bytes(), 64), Ok(()));
        let shipped = include_str!("../../config/keys.yaml");
        assert_eq!(check(shipped.as_bytes(), 8), Ok(()));
        // Compact block nesting is as deep as it looks, and counted once flow collections
        // are many enough to need the pass; without them it costs nothing to parse.
        let block = format!("keys:\n  {}x\n", "- ".repeat(100));
        assert_eq!(check(block.as_bytes(), 64), Ok(()));
        let mixed = format!("{block}other: [{}]\n", "[], ".repeat(64));
        assert!(check(mixed.as_bytes(), 64).is_err());
    }

    #[test]
    fn an_alias_is_refused_where_it_is_and_an_ampersand_in_a_scalar_is_not_one() {
        let text = "keys:\n  - scopes: &s [a, b]\n  - scopes: *s\n";
        assert_eq!(
            check(text.as_bytes(), 64),
            Err(Refused::Alias {
                line: 3,
                column: 13
            })
        );
        let text = "keys:\n  - subject_email: \"a&b@example.com\"\n    scopes: [\"*\"]\n";
        assert_eq!(check(text.as_bytes(), 64), Ok(()));
    }

    #[test]
    fn a_tag_or_a_tag_directive_is_refused_and_a_bang_in_a_scalar_is_not_one() {
        let directive = format!("%TAG !x! tag:{}\n---\nkeys: []\n", "A".repeat(100));
        assert_eq!(
            check(directive.as_bytes(), 64),
            Err(Refused::Tag { line: 1, column: 1 })
        );
        for text in [
            "keys: !!seq []\n",
            "keys:\n  - id: !!str a\n",
            "keys: [!x a]\n",
        ] {
            assert!(
                matches!(check(text.as_bytes(), 64), Err(Refused::Tag { .. })),
                "{text}"
            );
        }
        let text = "keys:\n  - subject_email: \"wow!@example.com\"\n    id: a!b\n";
        assert_eq!(check(text.as_bytes(), 64), Ok(()));
    }

    #[test]
    fn a_document_of_more_nodes_than_its_size_allows_is_refused() {
        let many = format!("keys: []\nx: [{}a]\n", "a,".repeat(200_000));
        let bound = max_events(many.len());
        assert_eq!(check(many.as_bytes(), 64), Err(Refused::TooMany { bound }));
        // A snapshot of ordinary keys, far past the first 100,000 events.
        let entry = "  - { id: key_0123, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, type: service_account, subject_id: s1, account_id: a1, scopes: [read, write] }\n";
        let keys = format!("keys:\n{}", entry.repeat(20_000));
        assert_eq!(check(keys.as_bytes(), 64), Ok(()));
    }

    #[test]
    fn a_syntax_error_is_left_to_the_real_parse_and_brackets_in_scalars_do_not_count() {
        assert_eq!(check(b"keys: [a, b\n  c: ]]]", 64), Ok(()));
        let quoted = format!("keys: [\"{}\", '{}']\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(check(quoted.as_bytes(), 4), Ok(()));
        let plain = format!("keys:\n  - id: a{}\n", "[".repeat(100));
        assert_eq!(check(plain.as_bytes(), 4), Ok(()));
        let comment = format!("keys: # {}\n  - a\n", "[".repeat(100));
        assert_eq!(check(comment.as_bytes(), 4), Ok(()));
    }

    #[test]
    fn the_config_pass_names_the_path_and_lets_aliases_through() {
        let refused = |text: &str| check_config(text.as_bytes()).unwrap_err();
        let r = refused("a: 1\nb:\n  c: [x, {d: !!str 1}]\n");
        assert_eq!(r.path, "b.c[1].d");
        assert_eq!(
            r.refused,
            Refused::Tag {
                line: 3,
                column: 14
            }
        );
        let r = refused("a: [1, 2]\nb: !t x\n");
        assert_eq!(r.path, "b");
        let r = refused(&format!("a: 1\nlist: {}\n", "[".repeat(100)));
        assert!(
            r.path.starts_with("list[0][0]") && r.path.len() < 200,
            "{}",
            r.path
        );
        assert!(matches!(r.refused, Refused::TooDeep { line: 2, .. }));
        assert_eq!(check_config(b"a: &x [1]\nb: *x\nc: 1\n"), Ok(()));
        // The snapshot's pass refuses the alias.
        assert!(matches!(
            check(b"a: &x [1]\nb: *x\n", 64),
            Err(Refused::Alias { .. })
        ));
    }

    #[test]
    fn a_deep_document_is_refused_in_time_linear_in_its_size() {
        // 400,000 levels take libyaml minutes to parse whole; the pass stops at level 65.
        let text = nested("[", "]", 400_000);
        let started = std::time::Instant::now();
        assert!(check(text.as_bytes(), MAX_DEPTH).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
