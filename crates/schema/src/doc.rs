//! An event held as one parse of its delivery: a [`Doc`] is the delivery's JSON text, shared by
//! every event of the delivery, and a tree of [`Val`]s whose strings and keys are byte ranges
//! of that text (a string with escapes is the one that owns its decoded text). A batch's shared
//! `context` is held once and each event refers to its members ([`Val::Shared`]) instead of
//! copying them. What the worker adds to an event (ids, times, the request's metadata) is owned
//! by the event.
//!
//! The tree reads like a `serde_json::Value` in the order that matters: parsing keeps members
//! in the order sent, a repeated key keeps its first place with the last value (as
//! `serde_json`'s ordered map does), [`ObjMut::remove`] swaps the last member into the removed
//! one's place (as `serde_json::Map::remove` does), and serialising a [`Node`] makes the same
//! serializer calls as serialising the `Value` it stands for. So JSON and BSON written from a
//! `Doc` are the bytes written from the `Value` it replaces.
//!
//! [`DocJson`] implements `jsonschema`'s `Json` trait on it, so the tracking plan validates an
//! event without it ever becoming a `Value`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use jsonschema::json::{cmp, Array, Json, Node as JsonNode, NodeIdentity, Object};
use jsonschema::JsonType;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A string or key: a byte range of the delivery's text, or its own decoded text (when the
/// sender escaped something in it, or the worker wrote it).
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Span { start: u32, end: u32 },
    Own(Box<str>),
}

impl Text {
    fn read<'a>(&'a self, text: &'a str) -> &'a str {
        match self {
            // A span comes from the parse of this very text; `get` keeps a mismatch from
            // panicking (it reads as empty instead).
            Self::Span { start, end } => {
                let read = text.get(*start as usize..*end as usize);
                debug_assert!(read.is_some(), "a span read against another text");
                read.unwrap_or("")
            }
            Self::Own(own) => own,
        }
    }
}

impl Text {
    /// Whether this reads as `key`: lengths first, so most members are passed over without
    /// reading their text.
    fn is(&self, text: &str, key: &str) -> bool {
        let len = match self {
            Self::Span { start, end } => end.saturating_sub(*start) as usize,
            Self::Own(own) => own.len(),
        };
        len == key.len() && self.read(text) == key
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self::Own(text.into())
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Self::Own(text.into_boxed_str())
    }
}

/// One JSON value of a [`Doc`].
#[derive(Debug, Clone, Default)]
pub enum Val {
    #[default]
    Null,
    Bool(bool),
    Num(Number),
    Str(Text),
    Arr(Vec<Val>),
    Obj(Vec<(Text, Val)>),
    /// Member `.1` of an object held once for several events (a batch's `context`).
    Shared(Arc<Val>, u32),
}

impl Val {
    pub fn string(text: impl Into<Text>) -> Self {
        Self::Str(text.into())
    }

    /// What a [`Val::Shared`] refers to; any other value itself.
    fn resolved(&self) -> &Val {
        match self {
            Self::Shared(object, index) => match &**object {
                Self::Obj(members) => members
                    .get(*index as usize)
                    .map_or(&Self::Null, |(_, value)| value.resolved()),
                _ => &Self::Null,
            },
            other => other,
        }
    }

    /// The value with owned text only: for a value moved to another [`Doc`].
    fn owned(&self, text: &str) -> Val {
        match self.resolved() {
            Self::Str(s) => Self::Str(Text::from(s.read(text))),
            Self::Arr(items) => Self::Arr(items.iter().map(|item| item.owned(text)).collect()),
            Self::Obj(members) => Self::Obj(
                members
                    .iter()
                    .map(|(key, value)| (Text::from(key.read(text)), value.owned(text)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn from_value(value: &Value) -> Val {
        match value {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => Self::Num(n.clone()),
            Value::String(s) => Self::Str(Text::from(s.as_str())),
            Value::Array(items) => Self::Arr(items.iter().map(Self::from_value).collect()),
            Value::Object(members) => Self::Obj(
                members
                    .iter()
                    .map(|(key, value)| (Text::from(key.as_str()), Self::from_value(value)))
                    .collect(),
            ),
        }
    }
}

/// One parsed JSON value and the text its spans are read from.
#[derive(Clone)]
pub struct Doc {
    text: Arc<str>,
    root: Val,
}

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(&self.node()) {
            Ok(json) => f.write_str(&json),
            Err(_) => f.write_str("<unwritable>"),
        }
    }
}

impl PartialEq for Doc {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

impl Default for Doc {
    fn default() -> Self {
        Self {
            text: Arc::from(""),
            root: Val::Obj(Vec::new()),
        }
    }
}

impl Doc {
    /// Parses JSON text with `serde_json`'s parser (the same grammar, the same nesting limit and
    /// the same numbers as `serde_json::from_str::<Value>`). Texts of 4 GiB or more are refused.
    pub fn parse(text: Arc<str>) -> Result<Doc, serde_json::Error> {
        if u32::try_from(text.len()).is_err() {
            return Err(serde::de::Error::custom("the text is 4 GiB or more"));
        }
        let mut deserializer = serde_json::Deserializer::from_str(&text);
        let root = ValSeed { text: &text }.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(Doc { text, root })
    }

    /// A `Doc` of a `Value` (its strings owned): for callers that hold a `Value` already.
    pub fn from_value(value: &Value) -> Doc {
        Doc {
            text: Arc::from(""),
            root: Val::from_value(value),
        }
    }

    /// Another value read from the same text (an event of a batch).
    pub fn with_root(&self, root: Val) -> Doc {
        Doc {
            text: Arc::clone(&self.text),
            root,
        }
    }

    /// An array's items, each a `Doc` of the same text; `None` if the value is not an array.
    pub fn into_items(self) -> Option<Vec<Doc>> {
        let Doc { text, root } = self;
        match root {
            Val::Arr(items) => Some(
                items
                    .into_iter()
                    .map(|root| Doc {
                        text: Arc::clone(&text),
                        root,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The value as its own `Doc`, its strings copied out of the shared text: what is kept of
    /// an event after its delivery (so it does not hold the whole delivery's text).
    pub fn detached(&self) -> Doc {
        Doc::from_owned(self.root.owned(&self.text))
    }

    /// This value, to be placed in `target`: as it is if both read the same text, else with
    /// its strings owned.
    pub fn val_for(&self, target: &Doc) -> Val {
        if Arc::ptr_eq(&self.text, &target.text) {
            self.root.clone()
        } else {
            self.root.owned(&self.text)
        }
    }

    fn from_owned(root: Val) -> Doc {
        Doc {
            text: Arc::from(""),
            root,
        }
    }

    pub fn node(&self) -> Node<'_> {
        Node::new(&self.text, &self.root)
    }

    pub fn root(&self) -> &Val {
        &self.root
    }

    pub fn into_root(self) -> Val {
        self.root
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The member `key` of the top-level object.
    pub fn get(&self, key: &str) -> Option<Node<'_>> {
        self.node().get(key)
    }

    /// The string member `key` of the top-level object.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|node| node.as_str())
    }

    pub fn is_object(&self) -> bool {
        matches!(self.root.resolved(), Val::Obj(_))
    }

    /// The top-level object, to change; `None` if the value is not an object.
    pub fn object_mut(&mut self) -> Option<ObjMut<'_>> {
        match &mut self.root {
            Val::Obj(members) => Some(ObjMut {
                text: &self.text,
                members,
            }),
            _ => None,
        }
    }

    /// The `serde_json::Value` this stands for (for cold paths: invalid records, tools, tests).
    pub fn to_value(&self) -> Value {
        self.node().to_value_owned()
    }

    /// The top-level object as a `serde_json::Map` (empty if the value is not an object).
    pub fn to_map(&self) -> Map<String, Value> {
        match self.to_value() {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

/// What [`Doc::edit_path`] does to one value it reaches.
#[derive(Debug, Clone)]
pub enum Edit {
    Keep,
    /// The member goes (an array item reached by a path is never removed: it becomes `null`).
    Remove,
    Set(Val),
}

/// Whether `key` matches one segment of a path: equal, or, for a segment that ends in `*`,
/// starting with what comes before it.
fn segment_matches(segment: &str, key: &str) -> bool {
    match segment.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == segment,
    }
}

/// Edits of values held once for several events ([`Val::Shared`]: a batch's `context`), kept
/// for one delivery: the first event that an edit reaches in such a value pays for its copy and
/// the edit, and each later event refers to the edited copy instead. An edit must give the same
/// result for the same value (it is not called again).
#[derive(Default)]
pub struct SharedEdits {
    /// (the shared object's address, the member's index, the edit's tag) -> the edit done.
    done: HashMap<(usize, u32, usize), SharedEdit>,
}

/// One edit of a shared value.
struct SharedEdit {
    /// The shared object, kept alive so that its address stays its own.
    _source: Arc<Val>,
    /// The edited member, as member 0 of an object of its own.
    edited: Arc<Val>,
    /// The values the edit reached in it.
    reached: usize,
}

impl Doc {
    /// Calls `edit` on each value that `path` reaches (object keys, each may end in `*`; a `*`
    /// alone also reaches each item of an array) and does what it answers; returns how many it
    /// reached. A value held once for several events (a batch's `context`) is copied into this
    /// one before it changes, so the others keep it; with `shared`, an edit of such a value
    /// (told apart by `tag`) is done once per delivery, and `edit` is told so (its second
    /// argument): what it answers then stands for every event of the delivery.
    pub fn edit_path<S: AsRef<str>>(
        &mut self,
        path: &[S],
        shared: Option<(&mut SharedEdits, usize)>,
        edit: &mut dyn FnMut(Node<'_>, bool) -> Edit,
    ) -> usize {
        let text = Arc::clone(&self.text);
        let mut shared = shared;
        edit_members(&text, &mut self.root, path, &mut shared, false, edit)
    }
}

fn edit_members<S: AsRef<str>>(
    text: &str,
    val: &mut Val,
    path: &[S],
    shared: &mut Option<(&mut SharedEdits, usize)>,
    in_shared: bool,
    edit: &mut dyn FnMut(Node<'_>, bool) -> Edit,
) -> usize {
    let Some((segment, rest)) = path.split_first() else {
        return 0;
    };
    if let Val::Shared(object, index) = &*val {
        // Only copied when something in it is reached.
        if !reaches(text, val.resolved(), path) {
            return 0;
        }
        let (object, index) = (Arc::clone(object), *index);
        let Some((edits, tag)) = shared else {
            *val = val.resolved().clone();
            return edit_members(text, val, path, &mut None, in_shared, edit);
        };
        let key = (Arc::as_ptr(&object) as usize, index, *tag);
        if let Some(done) = edits.done.get(&key) {
            *val = Val::Shared(Arc::clone(&done.edited), 0);
            return done.reached;
        }
        let source = object;
        let mut copy = val.resolved().clone();
        let reached = edit_members(text, &mut copy, path, &mut None, true, edit);
        let edited = Arc::new(Val::Obj(vec![(Text::from(""), copy)]));
        *val = Val::Shared(Arc::clone(&edited), 0);
        let done = SharedEdit {
            _source: source,
            edited,
            reached,
        };
        edits.done.insert(key, done);
        return reached;
    }
    let segment = segment.as_ref();
    if let (Val::Arr(items), "*") = (&mut *val, segment) {
        let mut reached = 0;
        for item in items.iter_mut() {
            if !rest.is_empty() {
                reached += edit_members(text, item, rest, shared, in_shared, edit);
                continue;
            }
            reached += 1;
            match edit(Node::new(text, item), in_shared) {
                Edit::Keep => {}
                Edit::Set(new) => *item = new,
                Edit::Remove => *item = Val::Null,
            }
        }
        return reached;
    }
    let Val::Obj(members) = val else {
        return 0;
    };
    let mut reached = 0;
    let mut index = 0;
    while index < members.len() {
        let (key, value) = &mut members[index];
        if !segment_matches(segment, key.read(text)) {
            index += 1;
            continue;
        }
        if !rest.is_empty() {
            reached += edit_members(text, value, rest, shared, in_shared, edit);
            index += 1;
            continue;
        }
        reached += 1;
        match edit(Node::new(text, value), in_shared) {
            Edit::Keep => index += 1,
            Edit::Set(new) => {
                *value = new;
                index += 1;
            }
            // In order: the event's members keep their places.
            Edit::Remove => {
                members.remove(index);
            }
        }
    }
    reached
}

/// Whether `path` reaches anything in `val`.
fn reaches<S: AsRef<str>>(text: &str, val: &Val, path: &[S]) -> bool {
    let Some((segment, rest)) = path.split_first() else {
        return true;
    };
    let segment = segment.as_ref();
    match val.resolved() {
        Val::Obj(members) => members.iter().any(|(key, value)| {
            segment_matches(segment, key.read(text)) && reaches(text, value, rest)
        }),
        Val::Arr(items) if segment == "*" => items.iter().any(|item| reaches(text, item, rest)),
        _ => false,
    }
}

impl serde::Serialize for Doc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.node().serialize(serializer)
    }
}

/// An object of a [`Doc`], to change. Keys are matched as decoded text.
pub struct ObjMut<'a> {
    text: &'a str,
    members: &'a mut Vec<(Text, Val)>,
}

impl<'a> ObjMut<'a> {
    fn position(&self, key: &str) -> Option<usize> {
        self.members.iter().position(|(k, _)| k.is(self.text, key))
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<Node<'_>> {
        self.position(key)
            .map(|at| Node::new(self.text, &self.members[at].1))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Sets `key`: in its place if present, else last.
    pub fn insert(&mut self, key: &str, value: Val) {
        match self.position(key) {
            Some(at) => self.members[at].1 = value,
            None => self.members.push((Text::from(key), value)),
        }
    }

    /// Adds `key` last unless present; returns whether it was added.
    pub fn insert_if_absent(&mut self, key: &str, value: impl FnOnce() -> Val) -> bool {
        if self.contains_key(key) {
            return false;
        }
        self.members.push((Text::from(key), value()));
        true
    }

    /// Removes `key`, the last member taking its place (as `serde_json::Map::remove` does).
    pub fn remove(&mut self, key: &str) -> Option<Val> {
        self.position(key).map(|at| self.members.swap_remove(at).1)
    }

    /// Keeps the members `keep` answers true for, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, Node<'_>) -> bool) {
        let text = self.text;
        self.members
            .retain(|(key, value)| keep(key.read(text), Node::new(text, value)));
    }

    /// The object member `key`, made an empty object first if absent; `None` if it is there
    /// and not an object (or is shared, which is never changed in place).
    pub fn object_entry(&mut self, key: &str) -> Option<ObjMut<'_>> {
        let at = match self.position(key) {
            Some(at) => at,
            None => {
                self.members.push((Text::from(key), Val::Obj(Vec::new())));
                self.members.len() - 1
            }
        };
        match &mut self.members[at].1 {
            Val::Obj(members) => Some(ObjMut {
                text: self.text,
                members,
            }),
            _ => None,
        }
    }

    /// Adds each member of `shared` (an object held once for many events) that this object
    /// lacks, last, in `shared`'s order, as a reference to it rather than a copy. Past
    /// [`LINEAR_KEYS`] members the object's own keys are looked up in a set, so a batch
    /// context of many keys costs each event linear time, not quadratic.
    pub fn merge_shared(&mut self, shared: &Arc<Val>) {
        let Val::Obj(members) = &**shared else {
            return;
        };
        let text = self.text;
        let own = self.members.len();
        let added: Vec<(Text, Val)> = if own + members.len() <= LINEAR_KEYS {
            let own = &self.members[..];
            lacking(members, text, |key| {
                own.iter().any(|(k, _)| k.is(text, key))
            })
        } else {
            let own: HashSet<&str> = self.members.iter().map(|(k, _)| k.read(text)).collect();
            lacking(members, text, |key| own.contains(key))
        }
        .into_iter()
        .map(|(index, key)| (key.clone(), Val::Shared(Arc::clone(shared), index)))
        .collect();
        self.members.extend(added);
    }
}

/// The members of a shared object (by index, and key) that `has` says are not there. The
/// shared object's own keys are unique (a parse keeps one of each).
fn lacking<'m>(
    members: &'m [(Text, Val)],
    text: &str,
    has: impl Fn(&str) -> bool,
) -> Vec<(u32, &'m Text)> {
    members
        .iter()
        .enumerate()
        .filter(|(_, (key, _))| !has(key.read(text)))
        .filter_map(|(index, (key, _))| u32::try_from(index).ok().map(|index| (index, key)))
        .collect()
}

/// A value of a [`Doc`] to read: the value and the text its spans are read from. Never a
/// [`Val::Shared`]: that is resolved to what it refers to.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    text: &'a str,
    val: &'a Val,
}

impl<'a> Node<'a> {
    pub fn new(text: &'a str, val: &'a Val) -> Self {
        Self {
            text,
            val: val.resolved(),
        }
    }

    pub fn val(&self) -> &'a Val {
        self.val
    }

    pub fn as_str(&self) -> Option<&'a str> {
        match self.val {
            Val::Str(s) => Some(s.read(self.text)),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.val, Val::Null)
    }

    pub fn as_number(&self) -> Option<&'a Number> {
        match self.val {
            Val::Num(n) => Some(n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self.val {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The members of an object, in order.
    pub fn members(&self) -> Option<impl Iterator<Item = (&'a str, Node<'a>)> + 'a> {
        let text = self.text;
        match self.val {
            Val::Obj(members) => Some(
                members
                    .iter()
                    .map(move |(key, value)| (key.read(text), Node::new(text, value))),
            ),
            _ => None,
        }
    }

    pub fn items(&self) -> Option<impl Iterator<Item = Node<'a>> + 'a> {
        let text = self.text;
        match self.val {
            Val::Arr(items) => Some(items.iter().map(move |item| Node::new(text, item))),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self.val, Val::Obj(_))
    }

    /// Members of an object or items of an array; 0 for anything else.
    pub fn len(&self) -> usize {
        match self.val {
            Val::Obj(members) => members.len(),
            Val::Arr(items) => items.len(),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        match self.val {
            Val::Obj(members) => members
                .iter()
                .find(|(k, _)| k.is(self.text, key))
                .map(|(_, value)| Node::new(self.text, value)),
            _ => None,
        }
    }

    /// The value with its strings owned, for keeping apart from the delivery.
    pub fn to_val(&self) -> Val {
        self.val.owned(self.text)
    }

    pub fn to_value_owned(&self) -> Value {
        match self.val {
            Val::Null | Val::Shared(..) => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Num(n) => Value::Number(n.clone()),
            Val::Str(s) => Value::String(s.read(self.text).to_owned()),
            Val::Arr(items) => Value::Array(
                items
                    .iter()
                    .map(|item| Node::new(self.text, item).to_value_owned())
                    .collect(),
            ),
            Val::Obj(members) => Value::Object(
                members
                    .iter()
                    .map(|(key, value)| {
                        (
                            key.read(self.text).to_owned(),
                            Node::new(self.text, value).to_value_owned(),
                        )
                    })
                    .collect(),
            ),
        }
    }
}

impl Node<'_> {
    /// Appends the value's compact JSON text: the bytes `serde_json::to_writer` writes for it.
    /// A span of the delivery is copied as it is (the parser took it unescaped, so it holds
    /// nothing `serde_json` would escape: no quote, backslash or control character); only
    /// owned strings are escaped.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self.val {
            Val::Null | Val::Shared(..) => out.extend_from_slice(b"null"),
            Val::Bool(true) => out.extend_from_slice(b"true"),
            Val::Bool(false) => out.extend_from_slice(b"false"),
            Val::Num(n) => write_serde(out, n),
            Val::Str(s) => write_text(out, self.text, s),
            Val::Arr(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    Node::new(self.text, item).write_json(out);
                }
                out.push(b']');
            }
            Val::Obj(members) => {
                out.push(b'{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_text(out, self.text, key);
                    out.push(b':');
                    Node::new(self.text, value).write_json(out);
                }
                out.push(b'}');
            }
        }
    }
}

fn write_text(out: &mut Vec<u8>, text: &str, s: &Text) {
    match s {
        Text::Span { .. } => {
            out.push(b'"');
            out.extend_from_slice(s.read(text).as_bytes());
            out.push(b'"');
        }
        Text::Own(own) => write_serde(out, &**own),
    }
}

/// `serde_json`'s own writing, for numbers and strings that may need escapes. Writing into a
/// `Vec` cannot fail; were it to, the bytes would be missing, which the tests would see.
fn write_serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

impl serde::Serialize for Node<'_> {
    /// The calls `serde_json::Value`'s `Serialize` makes for the value this stands for.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.val {
            Val::Null | Val::Shared(..) => serializer.serialize_unit(),
            Val::Bool(b) => serializer.serialize_bool(*b),
            Val::Num(n) => n.serialize(serializer),
            Val::Str(s) => serializer.serialize_str(s.read(self.text)),
            Val::Arr(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Node::new(self.text, item))?;
                }
                seq.end()
            }
            Val::Obj(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (key, value) in members {
                    map.serialize_entry(key.read(self.text), &Node::new(self.text, value))?;
                }
                map.end()
            }
        }
    }
}

/// Objects with more members than this find a repeated key through a hash table while
/// parsing, so a hostile object of many keys costs linear time, not quadratic.
const LINEAR_KEYS: usize = 32;

struct ValSeed<'t> {
    text: &'t str,
}

impl ValSeed<'_> {
    /// `s` as the span it is of the text, or as its own text if it lies elsewhere (a string
    /// `serde_json` had to unescape).
    fn text_of(&self, s: &str) -> Text {
        self.span(s).unwrap_or_else(|| Text::from(s))
    }

    /// The span of `s` if it lies in the text (a string `serde_json` borrowed from it).
    fn span(&self, s: &str) -> Option<Text> {
        let base = self.text.as_ptr() as usize;
        let at = (s.as_ptr() as usize).checked_sub(base)?;
        let end = at.checked_add(s.len())?;
        if end > self.text.len() {
            return None;
        }
        Some(Text::Span {
            start: u32::try_from(at).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }
}

impl<'de> DeserializeSeed<'de> for ValSeed<'_> {
    type Value = Val;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Val, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValSeed<'_> {
    type Value = Val;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Val, E> {
        Ok(Val::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Val, E> {
        Ok(Val::Num(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Val, E> {
        Ok(Val::Num(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Val, E> {
        Ok(Number::from_f64(v).map_or(Val::Null, Val::Num))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Val, E> {
        Ok(Val::Str(self.text_of(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Val, E> {
        Ok(Val::Str(self.text_of(v)))
    }

    fn visit_string<E>(self, v: String) -> Result<Val, E> {
        Ok(Val::Str(Text::from(v)))
    }

    fn visit_unit<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_none<E>(self) -> Result<Val, E> {
        Ok(Val::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(ValSeed { text: self.text })? {
            items.push(item);
        }
        Ok(Val::Arr(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
        let text = self.text;
        let mut members: Vec<(Text, Val)> = Vec::new();
        // Past LINEAR_KEYS members: each key's first place, by its text.
        let mut places: Option<HashMap<Box<str>, usize>> = None;
        while let Some(key) = map.next_key_seed(KeySeed { text })? {
            let value = map.next_value_seed(ValSeed { text })?;
            let name = key.read(text);
            let seen = match &places {
                Some(places) => places.get(name).copied(),
                None => members.iter().position(|(k, _)| k.is(text, name)),
            };
            match seen {
                Some(at) => members[at].1 = value,
                None => {
                    if let Some(places) = &mut places {
                        places.insert(name.into(), members.len());
                    }
                    members.push((key, value));
                    if places.is_none() && members.len() > LINEAR_KEYS {
                        places = Some(
                            members
                                .iter()
                                .enumerate()
                                .map(|(at, (k, _))| (k.read(text).into(), at))
                                .collect(),
                        );
                    }
                }
            }
        }
        Ok(Val::Obj(members))
    }
}

struct KeySeed<'t> {
    text: &'t str,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Text;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Text, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text, E> {
        Ok(ValSeed { text: self.text }.text_of(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Text, E> {
        Ok(ValSeed { text: self.text }.text_of(v))
    }

    fn visit_string<E>(self, v: String) -> Result<Text, E> {
        Ok(Text::from(v))
    }
}

/// `jsonschema`'s view of a [`Doc`]: validators built with `jsonschema::options_for::<DocJson>()`
/// take a [`Node`].
pub struct DocJson;

impl Json for DocJson {
    type Node<'a> = Node<'a>;
    type PreparedKey = String;
    type StringBuffer = Val;

    // A lookup scans the members, so one pass over them is never dearer than lookups
    // (`required`); `jsonschema` multiplies this by at most 16.
    const KEYS_PER_LOOKUP: usize = usize::MAX / 1024;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>(buffer: &mut Val, string: &str, f: impl FnOnce(Node<'_>) -> T) -> T {
        *buffer = Val::Str(Text::from(string));
        f(Node::new("", buffer))
    }
}

impl<'a> JsonNode<'a, DocJson> for Node<'a> {
    type Object = ObjRef<'a>;
    type Array = ArrRef<'a>;
    type Number = &'a Number;

    fn as_object(&self) -> Option<ObjRef<'a>> {
        match self.val {
            Val::Obj(members) => Some(ObjRef {
                text: self.text,
                members,
            }),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<ArrRef<'a>> {
        match self.val {
            Val::Arr(items) => Some(ArrRef {
                text: self.text,
                items,
            }),
            _ => None,
        }
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        Node::as_str(self).map(Cow::Borrowed)
    }

    fn as_number(&self) -> Option<&'a Number> {
        Node::as_number(self)
    }

    fn as_boolean(&self) -> Option<bool> {
        self.as_bool()
    }

    fn is_null(&self) -> bool {
        Node::is_null(self)
    }

    fn json_type(&self) -> JsonType {
        match self.val {
            Val::Null | Val::Shared(..) => JsonType::Null,
            Val::Bool(_) => JsonType::Boolean,
            Val::Num(_) => JsonType::Number,
            Val::Str(_) => JsonType::String,
            Val::Arr(_) => JsonType::Array,
            Val::Obj(_) => JsonType::Object,
        }
    }

    fn equals_value(&self, expected: &Value) -> bool {
        // The scalars an `enum` or `const` lists, without building a `Value`.
        match (self.val, expected) {
            (Val::Str(s), Value::String(e)) => s.read(self.text) == e,
            (Val::Str(_), _) | (_, Value::String(_)) => false,
            (Val::Null, Value::Null) => true,
            (Val::Bool(b), Value::Bool(e)) => b == e,
            (Val::Num(n), Value::Number(e)) => cmp::equal_numbers(&n, e),
            (Val::Arr(_) | Val::Obj(_), Value::Array(_) | Value::Object(_)) => {
                cmp::equal(&self.to_value_owned(), expected)
            }
            _ => false,
        }
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(self.to_value_owned())
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(
            std::ptr::from_ref::<Val>(self.val) as usize
        ))
    }
}

/// An object of a [`Doc`], for `jsonschema`.
#[derive(Clone, Copy)]
pub struct ObjRef<'a> {
    text: &'a str,
    members: &'a [(Text, Val)],
}

pub struct Members<'a> {
    text: &'a str,
    members: std::slice::Iter<'a, (Text, Val)>,
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, Node<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.members
            .next()
            .map(|(key, value)| (key.read(self.text), Node::new(self.text, value)))
    }
}

impl<'a> Object<'a, DocJson> for ObjRef<'a> {
    type Node = Node<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.members.len()
    }

    fn get(&self, key: &String) -> Option<Node<'a>> {
        self.members
            .iter()
            .find(|(k, _)| k.is(self.text, key))
            .map(|(_, value)| Node::new(self.text, value))
    }

    fn members(&self) -> Members<'a> {
        Members {
            text: self.text,
            members: self.members.iter(),
        }
    }
}

/// An array of a [`Doc`], for `jsonschema`.
#[derive(Clone, Copy)]
pub struct ArrRef<'a> {
    text: &'a str,
    items: &'a [Val],
}

pub struct Items<'a> {
    text: &'a str,
    items: std::slice::Iter<'a, Val>,
}

impl<'a> Iterator for Items<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        self.items.next().map(|item| Node::new(self.text, item))
    }
}

impl<'a> Array<'a, DocJson> for ArrRef<'a> {
    type Node = Node<'a>;
    type ElementsIter = Items<'a>;

    fn len(&self) -> usize {
        self.items.len()
    }

    fn elements(&self) -> Items<'a> {
        Items {
            text: self.text,
            items: self.items.iter(),
        }
    }
}

#[cfg(test)]
#[path = "doc/tests.rs"]
mod tests;

#[cfg(test)]
#[path = "doc/agrees_tests.rs"]
mod agrees_tests;
