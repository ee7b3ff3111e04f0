//! REST publishing (platform events, generic streaming push), emulator-only publishing of
//! PushTopic and change events, and the `/_emulator/*` fault-injection routes.
// Handlers return a finished error response on their rare failure paths; boxing it would only
// make them noisier.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bayeux_protocol::ChannelName;
use serde_json::{Map, Value, json};

use super::config::ChannelKind;
use super::{Emulator, bearer, iso_now, random_alnum};
use crate::broker::Broker;

#[derive(Clone)]
struct Ctx {
    emulator: Arc<Emulator>,
    broker: Arc<Broker>,
}

pub(crate) fn routes(emulator: Arc<Emulator>, broker: Arc<Broker>) -> Router {
    Router::new()
        .route(
            "/services/data/{version}/sobjects/StreamingChannel/{id}/push",
            post(generic_push).get(generic_online),
        )
        .route("/services/data/{version}/sobjects/{object}", post(sobject))
        .route("/services/data/{version}/sobjects/{object}/", post(sobject))
        .route("/_emulator/publish", post(emulator_publish))
        .route("/_emulator/revoke", post(fault_revoke))
        .route("/_emulator/expire-sessions", post(fault_expire))
        .route("/_emulator/disconnect", post(fault_disconnect))
        .route("/_emulator/busy", post(fault_busy))
        .route("/_emulator/stall", post(fault_stall))
        .with_state(Ctx { emulator, broker })
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    r
}

fn rest_error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(status, json!([{"message": message, "errorCode": code}]))
}

/// The user index of a valid bearer token, or the 401 Salesforce answers.
fn authenticate(ctx: &Ctx, headers: &HeaderMap) -> Result<usize, Response> {
    bearer(headers)
        .and_then(|t| ctx.emulator.validate(&t))
        .ok_or_else(|| {
            rest_error(
                StatusCode::UNAUTHORIZED,
                "INVALID_SESSION_ID",
                "Session expired or invalid",
            )
        })
}

fn not_found() -> Response {
    rest_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested resource does not exist",
    )
}

/// A stable, schema-ID-looking string for a channel (22 base64url characters).
fn schema_id(channel: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    (0..22)
        .map(|i| {
            for b in channel.bytes().chain([i as u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            T[(h >> 58) as usize] as char
        })
        .collect()
}

async fn publish(ctx: &Ctx, channel: &str, data: Value) -> Result<u64, Response> {
    publish_to(ctx, channel, data, None).await
}

/// Publishes through the durable log; with `users`, only sessions of those users receive it.
async fn publish_to(
    ctx: &Ctx,
    channel: &str,
    data: Value,
    users: Option<&[String]>,
) -> Result<u64, Response> {
    let name = ChannelName::new(channel).map_err(|_| not_found())?;
    let stored = match users {
        None => ctx.broker.publish_from_server(&name, data).await,
        Some(users) => {
            ctx.broker
                .publish_from_server_to(&name, data, "sf_user_id", users)
                .await
        }
    };
    stored.map_err(|e| {
        rest_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            &e.wire(bayeux_protocol::Dialect::Salesforce),
        )
    })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(rest_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "The request body must be a JSON object",
        )),
        Err(e) => Err(rest_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            &format!("Unexpected character: {e}"),
        )),
    }
}

/// `POST /services/data/vXX.X/sobjects/<Name>__e/`: publish a platform event.
async fn sobject(
    State(ctx): State<Ctx>,
    Path((_version, object)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = match authenticate(&ctx, &headers) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let channel = format!("/event/{object}");
    if !object.ends_with("__e") || ctx.emulator.config.channel(&channel).is_none() {
        return not_found();
    }
    let mut fields = match parse_object(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let uuid = uuid::Uuid::new_v4().to_string();
    fields.insert("CreatedDate".into(), Value::String(iso_now()));
    fields.insert(
        "CreatedById".into(),
        Value::String(ctx.emulator.config.users[user].user_id.clone()),
    );
    let data = json!({
        "schema": schema_id(&channel),
        "payload": fields,
        "event": {"EventUuid": uuid},
    });
    if let Err(r) = publish(&ctx, &channel, data).await {
        return r;
    }
    json_response(
        StatusCode::CREATED,
        json!({
            "id": format!("e00{}", random_alnum(15)),
            "success": true,
            "errors": [{"statusCode": "OPERATION_ENQUEUED", "message": uuid, "fields": []}],
        }),
    )
}

fn generic_channel<'a>(ctx: &'a Ctx, id: &str) -> Option<&'a str> {
    ctx.emulator
        .config
        .channels
        .iter()
        .find(|c| c.kind() == ChannelKind::Generic && c.id.as_deref() == Some(id))
        .map(|c| c.name.as_str())
}

/// `POST /services/data/vXX.X/sobjects/StreamingChannel/<id>/push`: generic streaming.
/// Every event goes through the durable log, so it has a replay ID and can be replayed.
/// Broadcasts (empty `userIds`) reach every subscriber (`fanoutCount: -1`); events naming users
/// reach only those users' sessions, live and in replays (`fanoutCount`: their subscribed
/// sessions now).
async fn generic_push(
    State(ctx): State<Ctx>,
    Path((_version, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authenticate(&ctx, &headers) {
        return r;
    }
    let Some(channel) = generic_channel(&ctx, &id).map(str::to_owned) else {
        return not_found();
    };
    let request = match parse_object(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(events) = request.get("pushEvents").and_then(Value::as_array) else {
        return rest_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "pushEvents is required",
        );
    };
    let online = ctx.emulator.online_user_ids();
    let mut results = Vec::new();
    for event in events {
        let payload = event.get("payload").cloned().unwrap_or(Value::Null);
        if payload.as_str().is_some_and(|p| p.chars().count() > 3000) {
            return rest_error(
                StatusCode::BAD_REQUEST,
                "STRING_TOO_LONG",
                "payload: data value too large (max length=3000)",
            );
        }
        let users: Vec<String> = event
            .get("userIds")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let data = json!({"event": {"createdDate": iso_now()}, "payload": payload});
        if users.is_empty() {
            if let Err(r) = publish(&ctx, &channel, data).await {
                return r;
            }
            results.push(json!({"fanoutCount": -1, "userOnlineStatus": {}}));
        } else {
            let mut status = Map::new();
            for u in &users {
                status.insert(u.clone(), Value::Bool(online.contains(u)));
            }
            let fanout = subscribed_sessions(&ctx, &channel, &users);
            if let Err(r) = publish_to(&ctx, &channel, data, Some(&users)).await {
                return r;
            }
            results.push(json!({"fanoutCount": fanout, "userOnlineStatus": status}));
        }
    }
    json_response(StatusCode::OK, Value::Array(results))
}

/// How many sessions of `users` are subscribed to `channel`.
fn subscribed_sessions(ctx: &Ctx, channel: &str, users: &[String]) -> usize {
    let mut count = 0;
    for id in ctx.broker.session_ids() {
        let Some(session) = ctx.broker.session(&id) else {
            continue;
        };
        let user = session
            .attributes
            .lock()
            .get("sf_user_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let subscribed = session.subscriptions().iter().any(|s| s == channel);
        if subscribed && user.is_some_and(|u| users.contains(&u)) {
            count += 1;
        }
    }
    count
}

/// `GET …/StreamingChannel/<id>/push`: who is online on the channel.
async fn generic_online(
    State(ctx): State<Ctx>,
    Path((_version, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authenticate(&ctx, &headers) {
        return r;
    }
    let Some(channel) = generic_channel(&ctx, &id) else {
        return not_found();
    };
    json_response(
        StatusCode::OK,
        json!({"OnlineUserIds": ctx.emulator.online_user_ids(), "ChannelName": channel}),
    )
}

/// `POST /_emulator/publish?channel=/topic/X[&type=updated]` with a record as the JSON body:
/// makes the event a DML would make, in the channel kind's shape, through the durable log.
async fn emulator_publish(
    State(ctx): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(name) = q.get("channel") else {
        return rest_error(StatusCode::BAD_REQUEST, "MISSING_ARGUMENT", "channel");
    };
    let Some(declared) = ctx.emulator.config.channel(name) else {
        return not_found();
    };
    let record = match parse_object(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let data = match declared.kind() {
        ChannelKind::PushTopic => json!({
            "event": {
                "createdDate": iso_now(),
                "type": q.get("type").map(String::as_str).unwrap_or("created"),
            },
            "sobject": record,
        }),
        ChannelKind::ChangeDataCapture => {
            let entity = q.get("entity").cloned().unwrap_or_else(|| {
                name.trim_start_matches("/data/")
                    .trim_end_matches("ChangeEvent")
                    .to_owned()
            });
            let change_type = q.get("changeType").map(String::as_str).unwrap_or("CREATE");
            // The record ID travels in the header only, as on Salesforce; an update lists the
            // fields it changed.
            let mut payload = record.clone();
            payload.remove("Id");
            let changed: Vec<&String> = if change_type == "UPDATE" {
                payload.keys().collect()
            } else {
                Vec::new()
            };
            let changed = json!(changed);
            payload.insert(
                "ChangeEventHeader".into(),
                json!({
                    "entityName": entity,
                    "recordIds": [record.get("Id").cloned().unwrap_or(Value::Null)],
                    "changeType": change_type,
                    "changeOrigin": "com.salesforce.core",
                    "transactionKey": uuid::Uuid::new_v4().to_string(),
                    "sequenceNumber": 1,
                    "isTransactionEnd": true,
                    "commitTimestamp": bayeux_engine::now_ms(),
                    "commitNumber": bayeux_engine::now_ms(),
                    "commitUser": ctx.emulator.config.users.first().map(|u| u.user_id.clone()).unwrap_or_default(),
                    "changedFields": changed,
                }),
            );
            json!({"schema": schema_id(name), "payload": payload, "event": {}})
        }
        ChannelKind::Generic => json!({
            "event": {"createdDate": iso_now()},
            "payload": record.get("payload").cloned().unwrap_or(Value::Object(record.clone())),
        }),
        ChannelKind::PlatformEvent => {
            let mut fields = record;
            fields.insert("CreatedDate".into(), Value::String(iso_now()));
            json!({
                "schema": schema_id(name),
                "payload": fields,
                "event": {"EventUuid": uuid::Uuid::new_v4().to_string()},
            })
        }
    };
    match publish(&ctx, name, data).await {
        Ok(replay_id) => json_response(
            StatusCode::OK,
            json!({"ok": true, "channel": name, "replayId": replay_id}),
        ),
        Err(r) => r,
    }
}

async fn fault_revoke(State(ctx): State<Ctx>) -> Response {
    let n = ctx.emulator.revoke_all();
    json_response(StatusCode::OK, json!({"ok": true, "revoked": n}))
}

async fn fault_expire(State(ctx): State<Ctx>) -> Response {
    let n = ctx.broker.expire_all();
    json_response(StatusCode::OK, json!({"ok": true, "expired": n}))
}

async fn fault_disconnect(State(ctx): State<Ctx>) -> Response {
    let n = ctx.broker.disconnect_all();
    json_response(StatusCode::OK, json!({"ok": true, "disconnected": n}))
}

fn number(q: &HashMap<String, String>, key: &str) -> Result<u64, Response> {
    q.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
        rest_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("{key} must be a whole number"),
        )
    })
}

async fn fault_busy(State(ctx): State<Ctx>, Query(q): Query<HashMap<String, String>>) -> Response {
    match number(&q, "count") {
        Ok(n) => {
            ctx.emulator.set_busy(n);
            json_response(StatusCode::OK, json!({"ok": true, "busy": n}))
        }
        Err(r) => r,
    }
}

async fn fault_stall(State(ctx): State<Ctx>, Query(q): Query<HashMap<String, String>>) -> Response {
    match number(&q, "seconds") {
        Ok(n) => {
            ctx.broker.stall(Duration::from_secs(n));
            json_response(StatusCode::OK, json!({"ok": true, "stall_seconds": n}))
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_ids_are_stable_and_distinct() {
        assert_eq!(schema_id("/event/A__e"), schema_id("/event/A__e"));
        assert_ne!(schema_id("/event/A__e"), schema_id("/event/B__e"));
        assert_eq!(schema_id("/event/A__e").len(), 22);
    }
}
