//! `bayeux publish`: publishes JSON data to a channel, over Bayeux or, with the Salesforce
//! login flags, as a platform event through the REST API.

use std::io::BufRead;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bayeux_client::auth::TokenProvider;
use bayeux_protocol::ChannelName;
use clap::Args;
use futures::StreamExt;
use serde_json::Value;

use crate::remote::{
    EndpointArgs, Failure, Log, SalesforceArgs, Target, TransportArg, describe, init_tracing,
    parse_duration, resolve,
};

/// Publishes DATA (or one JSON value per line of stdin) to CHANNEL and prints the server's
/// answer to each publish as one JSON line on stdout: the Bayeux publish reply, or with the
/// Salesforce login flags the REST reply of
/// `POST {instance_url}/services/data/v{api-version}/sobjects/{Name__e}/`. Stops at the first
/// refusal. Exit status: 0 all published; 1 a publish was refused or failed; 2 bad arguments
/// or a stdin line that is not JSON.
#[derive(Args, Debug)]
pub(crate) struct PublishArgs {
    /// The channel. With the Salesforce flags: a platform event channel, /event/Name__e.
    #[arg(value_name = "CHANNEL")]
    channel: String,
    /// The JSON data (`'{"text":"hi"}'`, `42`, `'"a string"'`). Omitted or `-`: one JSON
    /// value per line from stdin, each published in turn; blank lines are skipped.
    #[arg(value_name = "DATA", allow_hyphen_values = true)]
    data: Option<String>,
    /// Connection type (Bayeux only).
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportArg,
    /// Bounds each request and each login; a publish not acknowledged within twice this fails.
    #[arg(long, value_parser = parse_duration, default_value = "30", value_name = "S")]
    request_timeout: Duration,
    /// No state lines on stderr (errors are still printed).
    #[arg(short, long)]
    quiet: bool,
    // Flattened last: their help headings would otherwise carry over to the options above.
    #[command(flatten)]
    endpoint: EndpointArgs,
    #[command(flatten)]
    salesforce: SalesforceArgs,
}

/// Runs `bayeux publish`.
pub(crate) fn run(args: PublishArgs) -> ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Failure::Runtime(format!("cannot start the runtime: {e}")).report(),
    };
    let result = runtime.block_on(publish(args));
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

/// Where the data comes from.
enum Input {
    One(Option<Value>),
    Stdin(tokio::sync::mpsc::Receiver<Result<Value, Failure>>),
}

impl Input {
    async fn next(&mut self) -> Option<Result<Value, Failure>> {
        match self {
            Input::One(v) => v.take().map(Ok),
            Input::Stdin(rx) => rx.recv().await,
        }
    }
}

/// Reads stdin on a thread of its own (a blocking read must not hold a runtime thread).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<Result<Value, Failure>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let item = match line {
                Ok(l) if l.trim().is_empty() => continue,
                Ok(l) => serde_json::from_str::<Value>(&l)
                    .map_err(|e| Failure::Usage(format!("stdin line {}: not JSON: {e}", n + 1))),
                Err(e) => Err(Failure::Runtime(format!("stdin: {e}"))),
            };
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    rx
}

async fn publish(args: PublishArgs) -> Result<(), Failure> {
    let log = Log::new(args.quiet);
    let name = ChannelName::new(&args.channel)
        .map_err(|e| Failure::Usage(format!("channel {:?}: {e}", args.channel)))?;
    if name.is_wildcard() || args.channel.starts_with("/meta/") {
        return Err(Failure::Usage(format!(
            "cannot publish to {}: a wildcard or meta channel",
            args.channel
        )));
    }
    let sobject = match args.salesforce.sf_login_url {
        Some(_) => Some(platform_event(&args.channel)?),
        None => None,
    };
    let mut input = match args.data.as_deref() {
        None | Some("-") => Input::Stdin(stdin_lines()),
        Some(d) => Input::One(Some(
            serde_json::from_str(d)
                .map_err(|e| Failure::Usage(format!("DATA is not JSON: {e}")))?,
        )),
    };
    let target = resolve(&args.endpoint, &args.salesforce, args.request_timeout).await?;
    match sobject {
        Some(sobject) => rest_publish(&target, &sobject, &mut input, args.request_timeout).await,
        None => bayeux_publish(&target, &args, &mut input, &log).await,
    }
}

/// `/event/Name__e` → `Name__e`.
fn platform_event(channel: &str) -> Result<String, Failure> {
    channel
        .strip_prefix("/event/")
        .filter(|n| n.ends_with("__e") && !n.contains('/'))
        .map(str::to_owned)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "with the Salesforce login, publish goes to a platform event channel \
                 /event/Name__e through REST; {channel} is not one"
            ))
        })
}

fn print_line(value: &Value) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
        .and_then(|_| out.flush())
        .map_err(|e| Failure::Runtime(format!("stdout: {e}")))
}

async fn bayeux_publish(
    target: &Target,
    args: &PublishArgs,
    input: &mut Input,
    log: &Log,
) -> Result<(), Failure> {
    let client = target
        .builder()
        .transport(args.transport.into())
        .request_timeout(args.request_timeout)
        .operation_timeout(args.request_timeout * 2)
        // A publisher has nothing to replay.
        .replay(false)
        .give_up_after(5)
        .build()
        .map_err(|e| Failure::Usage(format!("{}: {e}", target.url)))?;
    let mut events = client.events();
    let printer = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                log.info(&describe(&e));
            }
        })
    };
    let mut result = Ok(());
    while let Some(item) = input.next().await {
        let data = match item {
            Ok(d) => d,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        match client.publish(&args.channel, data).await {
            Ok(ack) => {
                let line = serde_json::to_value(&ack).unwrap_or(Value::Null);
                if let Err(e) = print_line(&line) {
                    result = Err(e);
                    break;
                }
            }
            Err(e) => {
                result = Err(Failure::Runtime(format!(
                    "publish to {}: {e}",
                    args.channel
                )));
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.disconnect()).await;
    printer.abort();
    result
}

async fn rest_publish(
    target: &Target,
    sobject: &str,
    input: &mut Input,
    timeout: Duration,
) -> Result<(), Failure> {
    let (instance, version) = target.salesforce.clone().expect("a Salesforce target");
    let provider: Arc<dyn TokenProvider> = target.provider.clone().expect("a token provider");
    let url = format!("{instance}/services/data/v{version}/sobjects/{sobject}/");
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| Failure::Runtime(format!("HTTP client: {e}")))?;
    let login = || async {
        provider
            .token()
            .await
            .map_err(|e| Failure::Runtime(format!("Salesforce login failed: {e}")))
    };
    let mut token = login().await?;
    while let Some(item) = input.next().await {
        let fields = item?;
        if !fields.is_object() {
            return Err(Failure::Usage(format!(
                "a platform event's data is a JSON object of its fields, not {fields}"
            )));
        }
        let mut relogged = false;
        loop {
            let response = http
                .post(&url)
                .header("authorization", token.authorization())
                .json(&fields)
                .send()
                .await
                .map_err(|e| Failure::Runtime(format!("POST {url}: {e}")))?;
            let status = response.status();
            let body = response
                .text()
                .await
                .map_err(|e| Failure::Runtime(format!("POST {url}: {e}")))?;
            if status.as_u16() == 401 && !relogged {
                // Expired or revoked: log in again once and retry (nothing was published).
                relogged = true;
                token = login().await?;
                continue;
            }
            if !status.is_success() {
                return Err(Failure::Runtime(format!(
                    "POST {url}: HTTP {}: {body}",
                    status.as_u16()
                )));
            }
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            print_line(&value)?;
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_event_names() {
        assert_eq!(platform_event("/event/Order__e").unwrap(), "Order__e");
        assert!(platform_event("/topic/Order").is_err());
        assert!(platform_event("/event/Order").is_err());
    }
}
