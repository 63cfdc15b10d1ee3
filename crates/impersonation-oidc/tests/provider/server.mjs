// A real OpenID provider on loopback for impersonation-oidc's tests:
// oidc-provider with JWT access tokens for one API (RFC 9068), a test grant
// that logs a user in without a browser, and a token-exchange grant that
// records the actor (RFC 8693 §4.1) for the client part's tests.
//
// usage: node server.mjs PORT API_AUDIENCE [ISSUER]
// prints `READY <issuer>` once listening. ISSUER (default
// http://127.0.0.1:PORT) is the address it names itself by, for a test
// that puts a proxy in front of it.
import { generateKeyPairSync, randomUUID } from 'node:crypto';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';
import ResourceServer from 'oidc-provider/lib/helpers/resource_server.js';

const port = Number(process.argv[2]);
const api = process.argv[3];
const issuer = process.argv[4] || `http://127.0.0.1:${port}`;

// The people the provider knows; the app decides who may impersonate whom.
const users = new Set(['sam', 'lee', 'kim', 'olive', 'oscar', 'paula', 'ada', 'mallory']);

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
const publicJwk = (({ kty, n, e, kid, alg, use }) => ({ kty, n, e, kid, alg, use }))(signingJwk);
const publicKeys = jose.createLocalJWKSet({ keys: [publicJwk] });

const resourceInfo = {
  scope: 'api',
  audience: api,
  accessTokenFormat: 'jwt',
  accessTokenTTL: 600,
  jwt: { sign: { alg: 'RS256' } },
};

const TEST_LOGIN = 'urn:test:grant-type:login';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';

// The actor of a token exchange, handed from the grant to the token's claims.
const actors = new WeakMap();

const provider = new Provider(issuer, {
  jwks: { keys: [signingJwk] },
  extraTokenClaims: (ctx) => (actors.has(ctx) ? { act: { sub: actors.get(ctx) } } : undefined),
  clients: [
    {
      client_id: 'agent-app',
      client_secret: 'agent-app-secret',
      grant_types: [TEST_LOGIN, TOKEN_EXCHANGE],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      // The support console's own front end: tests that take actor tokens
      // only from it.
      client_id: 'console-ui',
      client_secret: 'console-ui-secret',
      grant_types: [TEST_LOGIN],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  features: {
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => api,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, indicator) => {
        if (indicator !== api) throw new errors.InvalidTarget();
        return resourceInfo;
      },
    },
  },
  findAccount: (_ctx, id) => (users.has(id) ? { accountId: id, claims: () => ({ sub: id }) } : undefined),
});

async function accessToken(ctx, accountId, scope = 'api') {
  const token = new ctx.oidc.provider.AccessToken({
    accountId,
    client: ctx.oidc.client,
    scope,
  });
  token.resourceServer = new ResourceServer(api, resourceInfo);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope,
  };
}

// A user's access token without a browser: tests only. `token_scope`
// (default `api`) is the scope the token grants.
provider.registerGrantType(TEST_LOGIN, async (ctx) => {
  const { username, token_scope: tokenScope } = ctx.oidc.params;
  if (!users.has(username)) throw new errors.InvalidGrant('unknown user');
  await accessToken(ctx, username, tokenScope || 'api');
}, ['username', 'token_scope']);

async function verified(token) {
  try {
    const { payload } = await jose.jwtVerify(token, publicKeys, { issuer, audience: api });
    return payload;
  } catch {
    throw new errors.InvalidGrant('the token did not verify');
  }
}

// RFC 8693 for the client part: the actor's token, the customer by
// requested_subject or subject_token; the issued token records the actor.
provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const p = ctx.oidc.params;
  if (!p.actor_token) throw new errors.InvalidRequest('actor_token is required');
  const actor = await verified(p.actor_token);
  let subject = p.requested_subject;
  if (p.subject_token) subject = (await verified(p.subject_token)).sub;
  if (!subject || !users.has(subject)) throw new errors.InvalidGrant('unknown subject');
  if (subject === actor.sub) throw new errors.InvalidGrant('an actor cannot act as themself');
  actors.set(ctx, actor.sub);
  await accessToken(ctx, subject);
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_subject', 'audience', 'reason'], ['audience']);

provider.listen(port, '127.0.0.1', () => {
  console.log(`READY ${issuer}`);
});
