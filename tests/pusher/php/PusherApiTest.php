<?php
// Pusher's PHP server SDK (pusher/pusher-php-server) is not installable here (no Packagist):
// this test makes its requests as it does, with php-curl, against a running wsboard, and
// checks the signing against the worked examples in Pusher's documentation.
// Environment: WSBOARD_URL, PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET (set by test_pusher.py).

use PHPUnit\Framework\TestCase;

final class PusherApiTest extends TestCase
{
    private string $url;
    private string $appId;
    private string $key;
    private string $secret;

    protected function setUp(): void
    {
        $this->url = getenv('WSBOARD_URL');
        $this->appId = getenv('PUSHER_APP_ID');
        $this->key = getenv('PUSHER_KEY');
        $this->secret = getenv('PUSHER_SECRET');
    }

    /** The SDK's build_auth_query_params: ksort, joined unescaped, HMAC-SHA256 over
     * "METHOD\nPATH\nQUERY"; the URL carries the same parameters http_build_query'd. */
    private static function signedQuery(string $key, string $secret, string $method, string $path,
                                        array $params, int $time): string
    {
        $params = array_merge(['auth_key' => $key, 'auth_timestamp' => $time, 'auth_version' => '1.0'], $params);
        ksort($params);
        $pairs = [];
        foreach ($params as $name => $value) {
            $pairs[] = "$name=$value";
        }
        $params['auth_signature'] = hash_hmac('sha256', "$method\n$path\n" . implode('&', $pairs), $secret);
        return http_build_query($params);
    }

    /** One request as the SDK sends it: [status, decoded JSON body]. */
    private function request(string $method, string $path, array $params = [], ?string $body = null,
                             ?string $secret = null, ?int $time = null): array
    {
        $path = "/apps/{$this->appId}$path";
        if ($body !== null) {
            $params['body_md5'] = md5($body);
        }
        $query = self::signedQuery($this->key, $secret ?? $this->secret, $method, $path, $params, $time ?? time());
        $curl = curl_init("{$this->url}$path?$query");
        curl_setopt_array($curl, [
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_HTTPHEADER => ['Content-Type: application/json', 'X-Pusher-Library: pusher-http-php 7.2.7'],
            CURLOPT_TIMEOUT => 10,
        ]);
        if ($body !== null) {
            curl_setopt($curl, CURLOPT_POSTFIELDS, $body);
        }
        $answer = curl_exec($curl);
        $this->assertNotFalse($answer, curl_error($curl));
        $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        curl_close($curl);
        return [$status, json_decode($answer, true)];
    }

    public function testSigningMatchesPushersDocumentedExamples(): void
    {
        $secret = '7ad3773142a6692b25b8';
        $this->assertSame(
            '58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4',
            hash_hmac('sha256', '1234.1234:private-foobar', $secret)
        );
        $this->assertSame(
            '31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80',
            hash_hmac('sha256', '1234.1234:presence-foobar:{"user_id":10,"user_info":{"name":"Mr. Channels"}}', $secret)
        );
        $body = '{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}';
        $query = self::signedQuery('278d425bdf160c739803', $secret, 'POST', '/apps/3/events',
                                   ['body_md5' => md5($body)], 1353088179);
        parse_str($query, $params);
        $this->assertSame('ec365a775a4cd0599faeb73354201b6f', $params['body_md5']);
        $this->assertSame('da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c', $params['auth_signature']);
    }

    public function testTriggerReachesTheChannelAndAnswersAnEmptyObject(): void
    {
        $body = json_encode(['name' => 'App\\Events\\Posted', 'data' => json_encode(['from' => 'php']),
                             'channels' => ['php-news']]);
        [$status, $answer] = $this->request('POST', '/events', [], $body);
        $this->assertSame(200, $status);
        $this->assertSame([], $answer);
        $batch = json_encode(['batch' => [['name' => 'second', 'channel' => 'php-news', 'data' => 'two']]]);
        [$status, $answer] = $this->request('POST', '/batch_events', [], $batch);
        $this->assertSame([200, []], [$status, $answer]);
    }

    public function testChannelQueriesAnswerAsThePhpSdkExpects(): void
    {
        [$status, $answer] = $this->request('GET', '/channels/php-news', ['info' => 'subscription_count']);
        $this->assertSame(200, $status);
        $this->assertSame(['occupied' => true, 'subscription_count' => 1], $answer);
        [$status, $answer] = $this->request('GET', '/channels', ['filter_by_prefix' => 'php-']);
        $this->assertSame(200, $status);
        $this->assertSame(['channels' => ['php-news' => []]], $answer);
    }

    public function testAWrongSecretOrAnOldTimestampIsRefusedWithAReason(): void
    {
        [$status, $answer] = $this->request('GET', '/channels', [], null, 'not-the-secret');
        $this->assertSame(401, $status);
        $this->assertStringContainsString('Invalid signature', $answer['error']);
        [$status, $answer] = $this->request('GET', '/channels', [], null, null, time() - 601);
        $this->assertSame(401, $status);
        $this->assertStringContainsString('expired', $answer['error']);
    }
}
