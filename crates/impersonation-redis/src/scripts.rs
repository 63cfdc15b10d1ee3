//! The Lua scripts: one per store write, each atomic in Redis and confined
//! to one agent's hash slot.
//!
//! Redis Lua has no SHA-256, so the client seals each event against the
//! chain head it expects, and the script applies the write only if the head
//! is still that one (compare-and-set). Otherwise, unless the call's own
//! first event is at its place already (a call sent again after its reply
//! was lost: the script then answers as its first run did), it returns the
//! current head (`{'head', seq, hash}`) and the client reseals and retries.
//! Within one process writes to a chain are queued, so a retry only happens
//! when another process wrote the agent's chain since this one last did.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{
    Arg, Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs,
};

/// Shared helpers, prepended to each script.
const PRELUDE: &str = r#"
-- The stream entry id of place `seq` + `after`: written with '%d', as Lua
-- writes a number from 1e14 on as '1e+14', which no stream id is.
local function entry(seq, after)
  return string.format('0-%d', tonumber(seq) + after)
end
-- A head with one of its fields gone (damage) reads as '' there: it
-- matches no head a client expects, so nothing is appended on it, and the
-- client, told of it, reports it as corrupt.
local function head_of(k)
  local h = redis.call('HMGET', k, 'seq', 'hash')
  if not h[1] and not h[2] then return '-1', '' end
  return h[1] or '', h[2] or ''
end
-- A session id as the client writes it: a hyphenated UUID.
local UUID = '^' .. string.rep('%x', 8) .. '%-' .. string.rep('%x', 4) .. '%-' ..
  string.rep('%x', 4) .. '%-' .. string.rep('%x', 4) .. '%-' .. string.rep('%x', 12) .. '$'
-- An agent's live marker `k`: the session id it holds, false if none, or
-- 'damaged' if the key holds no string or an empty one (a hand edit, a
-- partial restore), which names no session either (and '' would read as
-- a lost reply's), read without the error that would stop a script
-- after its first writes. `sk` is a session key of the marker's slot
-- (`...:s:<id>`), whose prefix names the marker's session there.
local function marker(k, sk)
  local v = redis.pcall('GET', k)
  if (type(v) == 'table' and v.err) or v == '' then return 'damaged' end
  -- A string that is no session id is damage too, and so is the id of a
  -- session that is gone (its hash deleted by hand, or not restored):
  -- the marker and its session's hash are written, and live, together.
  -- An end whose marker it is deletes it, as it does any damaged one.
  if v and not string.match(v, UUID) then return 'damaged' end
  if v and redis.call('EXISTS', string.match(sk, '^(.*:s:)') .. v) == 0 then
    return 'damaged'
  end
  return v
end
local function head_is(k, seq, hash)
  local s, h = head_of(k)
  return s == seq and h == hash
end
local function moved(k)
  local s, h = head_of(k)
  return {'head', s, h}
end
-- Whether `event` is the record at place `seq` of the chain: the call that
-- brings it ran before, its reply was lost, and the client sent it again
-- (the cluster client does, on a dropped connection), maybe after other
-- writes. The record holds the event's id and hash, and its hash covers
-- every event before it, so no other write can match it.
local function landed(head_k, chain_k, seq, event)
  local s = tonumber((head_of(head_k)))
  if not s or s < tonumber(seq) then return false end
  local id = entry(seq, 1)
  local e = redis.call('XRANGE', chain_k, id, id)
  return e[1] ~= nil and e[1][2][2] == event
end
local function append(head_k, chain_k, seq, hash, event)
  redis.call('XADD', chain_k, entry(seq, 1), 'e', event)
  redis.call('HSET', head_k, 'seq', seq, 'hash', hash)
end
"#;

/// KEYS: head, chain, live, session, secret.
/// ARGV: expected seq, expected hash, session id, ttl ms, start event, its seq,
/// its hash, refusal event, its seq, its hash, then the session's fields
/// record, shadow, state, version, last_seen_us, last_checked_us, expires_us, idle_us.
const START: &str = r#"
if not head_is(KEYS[1], ARGV[1], ARGV[2]) then
  -- As the first run answered, with the head as it is now.
  local s, h = head_of(KEYS[1])
  if landed(KEYS[1], KEYS[2], ARGV[6], ARGV[5]) then return {'started', s, h} end
  if landed(KEYS[1], KEYS[2], ARGV[9], ARGV[8]) then
    return {'refused', marker(KEYS[3], KEYS[4]) or '', s, h}
  end
  return moved(KEYS[1])
end
local live = marker(KEYS[3], KEYS[4])
if live then
  append(KEYS[1], KEYS[2], ARGV[9], ARGV[10], ARGV[8])
  return {'refused', live}
end
-- The event first: if its XADD fails (a full server, a stream damaged
-- by eviction), Redis does not undo what ran before it, so nothing may.
append(KEYS[1], KEYS[2], ARGV[6], ARGV[7], ARGV[5])
redis.call('HSET', KEYS[4], 'record', ARGV[11], 'shadow', ARGV[12], 'state', ARGV[13], 'version', ARGV[14],
  'last_seen_us', ARGV[15], 'last_checked_us', ARGV[16], 'expires_us', ARGV[17], 'idle_us', ARGV[18])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return {'started'}
"#;

/// KEYS: head, chain, live, session, secret.
/// ARGV: expected seq, expected hash, expected version, session id, ttl ms,
/// event, its seq, its hash, then the session's fields as in START.
const TRANSITION: &str = r#"
if not head_is(KEYS[1], ARGV[1], ARGV[2]) then
  if landed(KEYS[1], KEYS[2], ARGV[7], ARGV[6]) then
    local s, h = head_of(KEYS[1])
    return {'ok', s, h}
  end
  return moved(KEYS[1])
end
local v = redis.call('HGET', KEYS[4], 'version')
if not v then return {'notfound'} end
if v ~= ARGV[3] then return {'conflict'} end
local live = marker(KEYS[3], KEYS[4])
-- The event first, as in START.
append(KEYS[1], KEYS[2], ARGV[7], ARGV[8], ARGV[6])
redis.call('HSET', KEYS[4], 'record', ARGV[9], 'shadow', ARGV[10], 'state', ARGV[11], 'version', ARGV[12],
  'last_seen_us', ARGV[13], 'last_checked_us', ARGV[14], 'expires_us', ARGV[15], 'idle_us', ARGV[16])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('PEXPIRE', KEYS[5], ARGV[5])
if ARGV[11] == 'ended' then
  -- (A damaged marker can have named only this session: one live session
  -- per agent.)
  if live == ARGV[4] or live == 'damaged' then redis.call('DEL', KEYS[3]) end
else
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
end
return {'ok'}
"#;

/// Events on one chain, in order (one or many), placed right after the
/// expected head. KEYS: head, chain, then the distinct session keys that
/// guard some event. ARGV: expected seq, expected hash, the last event's
/// seq and hash (the new head), then per event: its guard (`0`: none, `k`: the
/// session at KEYS[2 + k] must be active) and the event. The client sealed
/// the events as if all pass, so if any guard fails nothing is written and
/// the reply lists the refused positions (`{'refused', i, reason, ...}`,
/// 1-based) for the client to drop and reseal the rest.
const APPEND_MANY: &str = r#"
if not head_is(KEYS[1], ARGV[1], ARGV[2]) then
  -- The events go in together: the first one landed means all did.
  if landed(KEYS[1], KEYS[2], tonumber(ARGV[1]) + 1, ARGV[6]) then
    local s, h = head_of(KEYS[1])
    return {'ok', s, h}
  end
  return moved(KEYS[1])
end
local n = (#ARGV - 4) / 2
local refused = {}
-- Each guarding session's state, read once.
local states = {}
for k = 3, #KEYS do
  states[k - 2] = redis.call('HGET', KEYS[k], 'state') or false
end
for i = 1, n do
  local g = tonumber(ARGV[3 + i * 2])
  if g > 0 then
    local st = states[g]
    if not st then
      table.insert(refused, tostring(i)); table.insert(refused, 'notfound')
    elseif st ~= 'active' then
      table.insert(refused, tostring(i)); table.insert(refused, 'notactive')
    end
  end
end
if #refused > 0 then
  table.insert(refused, 1, 'refused')
  return refused
end
-- Event i has seq expected + i, stored at id 0-(seq + 1); then the head once.
for i = 1, n do
  redis.call('XADD', KEYS[2], entry(ARGV[1], 1 + i), 'e', ARGV[4 + i * 2])
end
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'hash', ARGV[4])
return {'ok'}
"#;

/// The per-request lookup, one command. KEYS: secret key.
/// ARGV: session key prefix (same slot), now µs, coalesce µs (empty: no touch).
/// Reply: nil (no session), `{'absent'}` (the secret names a session whose
/// hash this node does not hold), `{'damaged', missing field names...}`,
/// `{'malformed', names of fields that are not numbers...}`, or the
/// fields the client decodes (`SESSION_FIELDS`).
const RESOLVE: &str = r#"
local sid = redis.call('GET', KEYS[1])
if not sid then return false end
local k = ARGV[1] .. sid
local names = {'record', 'shadow', 'last_seen_us', 'last_checked_us', 'version', 'state', 'expires_us', 'idle_us'}
local s = redis.call('HMGET', k, unpack(names))
local missing = {'damaged'}
for i = 1, #names do
  if not s[i] then table.insert(missing, names[i]) end
end
-- None at all: the secret's key and the session's hash are written and
-- expire together, in one script each time, so this node holds the one
-- and not the other only while their slot moves (the secret's key gone
-- ahead: Redis sent this lookup here with ASK) or after damage. Not "no
-- session", which would clear a live session's cookie.
if #missing > #names then return {'absent'} end
-- Some fields but not all: a damaged hash, for the client to report.
if #missing > 1 then return missing end
-- Fields this script reads as numbers: one that is not an integer, as
-- the client writes them (tonumber would take '1e6', '0x1F' or ' 12 '),
-- is as damaged as one missing, for the client to report, not a script
-- error (an outage). The client checks the same on a lookup by id.
local bad = {'malformed'}
for _, i in ipairs({3, 7, 8}) do
  if not string.match(s[i], '^%-?%d+$') then table.insert(bad, names[i]) end
end
if #bad > 1 then return bad end
if ARGV[3] ~= '' then
  local now = tonumber(ARGV[2])
  local seen = tonumber(s[3])
  local idle = tonumber(s[8])
  -- Coalesced at most half the idle timeout, or a busy session idles out.
  local coalesce = math.min(tonumber(ARGV[3]), math.floor(idle / 2))
  if s[6] == 'active' and tonumber(s[7]) > now and seen + idle > now and seen + coalesce <= now then
    redis.call('HSET', k, 'last_seen_us', ARGV[2])
  end
end
return {s[1], s[2], s[3], s[4], s[5]}
"#;

/// KEYS: session. ARGV: version, checked µs, shadow.
const RECORD_CHECK: &str = r#"
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return 'notfound' end
if v ~= ARGV[1] then return 'conflict' end
redis.call('HSET', KEYS[1], 'last_checked_us', ARGV[2], 'shadow', ARGV[3])
return 'ok'
"#;

/// Repairs an agent's damaged live-session marker, if it still holds the
/// damaged value: names the session found live instead, for as long as
/// that session's hash lives, if it is live still; else deletes it.
/// KEYS: the marker, the found session's hash (any key of the slot if
/// none was found). ARGV: the damaged value, the found session's id (or
/// ''). Answers 1 if the marker names the session now, 0 if not.
const REPAIR_LIVE_MARKER: &str = r#"
if marker(KEYS[1], KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  local state = redis.call('HGET', KEYS[2], 'state')
  local ttl = redis.call('PTTL', KEYS[2])
  if (state == 'active' or state == 'pending') and ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
    return 1
  end
end
redis.call('DEL', KEYS[1])
return 0
"#;

/// Marks a chain's audit views stale from a position: KEYS[1] the
/// stale-views hash; ARGV the chain, the position, a nonce. The mark is
/// `<lowest position>|<nonce>`. Sent by its source (`EVAL`), not its
/// hash: it is sent on a failure, tried again as the view writes are, and
/// must not depend on the server knowing it.
pub(crate) const MARK_STALE: &str = r#"
-- Positions compared as numbers but written as the strings they came
-- as: Lua 5.1 would print a large number as 1e+14.
local seq = ARGV[2]
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local s = string.match(cur, '^(%d+)|')
  if s and tonumber(s) < tonumber(seq) then seq = s end
end
redis.call('HSET', KEYS[1], ARGV[1], seq .. '|' .. ARGV[3])
return 1
"#;

/// Takes a chain's stale mark if it is still the one read: KEYS[1] the
/// stale-views hash; ARGV the chain, the mark. Sent by its source, as
/// [`MARK_STALE`].
pub(crate) const UNMARK_STALE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

/// A script and its source: calls go by its hash (`EVALSHA`), and by its
/// source when the server does not know it (`EVAL`).
pub(crate) struct Lua {
    script: Script,
    code: String,
}

impl Lua {
    fn new(code: String) -> Self {
        Self {
            script: Script::new(&code),
            code,
        }
    }

    /// The script's SHA-1, as `EVALSHA` takes it.
    pub(crate) fn get_hash(&self) -> &str {
        self.script.get_hash()
    }
}

fn with_prelude(body: &str) -> Lua {
    Lua::new(format!("{PRELUDE}{body}"))
}

pub(crate) static START_SCRIPT: LazyLock<Lua> = LazyLock::new(|| with_prelude(START));
pub(crate) static TRANSITION_SCRIPT: LazyLock<Lua> = LazyLock::new(|| with_prelude(TRANSITION));
pub(crate) static APPEND_MANY_SCRIPT: LazyLock<Lua> = LazyLock::new(|| with_prelude(APPEND_MANY));
pub(crate) static RESOLVE_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(RESOLVE.to_owned()));
pub(crate) static REPAIR_LIVE_MARKER_SCRIPT: LazyLock<Lua> =
    LazyLock::new(|| with_prelude(REPAIR_LIVE_MARKER));
pub(crate) static RECORD_CHECK_SCRIPT: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(RECORD_CHECK.to_owned()));

/// One call of a script, built as a single `EVALSHA` command whose keys and
/// arguments are written once, straight into the command's buffer. (A
/// `ScriptInvocation` copies each argument into a `Vec` of its own, then
/// again into the command: for the append script, every event's record
/// twice more.)
pub(crate) struct ScriptCall {
    script: &'static Lua,
    cmd: Cmd,
}

impl ScriptCall {
    /// A call of `script` with `keys`, room made for `args` arguments of
    /// about `bytes` bytes in all.
    pub(crate) fn new(script: &'static Lua, keys: &[String], args: usize, bytes: usize) -> Self {
        let hash = script.get_hash();
        let key_bytes: usize = keys.iter().map(String::len).sum();
        let mut cmd = Cmd::with_capacity(
            3 + keys.len() + args,
            "EVALSHA".len() + hash.len() + 20 + key_bytes + bytes,
        );
        cmd.arg("EVALSHA").arg(hash).arg(keys.len());
        for key in keys {
            cmd.arg(key.as_str());
        }
        Self { script, cmd }
    }

    /// Adds an argument (`ARGV[i]`).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Runs the call; if the server does not know the script (`NOSCRIPT`:
    /// restarted, flushed, or a node new since a failover), runs it once
    /// more by its source (`EVAL`), which the node that owns the keys then
    /// keeps. (Loading it first with `SCRIPT LOAD` goes to every node of a
    /// cluster, and fails while any of them is unreachable.) `NOSCRIPT`
    /// means the script did not run, so it runs once either way.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let mut eval = Cmd::with_capacity(self.cmd.args_iter().len(), 0);
                eval.arg("EVAL").arg(self.script.code.as_str());
                // After `EVALSHA` and the hash: the key count, keys, arguments.
                for arg in self.cmd.args_iter().skip(2) {
                    if let Arg::Simple(bytes) = arg {
                        eval.arg(bytes);
                    }
                }
                eval.query_async(conn).await
            }
            other => other,
        }
    }
}
